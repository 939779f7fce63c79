"""The CA server's HTTP limits under hostile clients (SECURITY-TESTS E).

The control plane's HTTPS server (``meshd/server/http.py``) is the one HTTP parser meshd
exposes to the network. These tests drive the real server (h11 over trio's TLS, a real
loopback listener) with a handler that answers what it was given, and check each limit
from the outside: oversized request lines and headers are answered 431 and the connection
closed, header counts are bounded by the same size limit, a client that trickles its
request or never finishes its handshake is cut at the deadline (virtual time), and
connections beyond ``max_connections``, or beyond ``max_per_source`` from one address, are
closed at once.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import AsyncIterator

import pytest
import trio
import trustme

from meshd.config import ConfigError
from meshd.config.server import parse_server_config
from meshd.server.http import (
    HANDSHAKE_TIMEOUT_S,
    MAX_HEADER_BYTES,
    REQUEST_TIMEOUT_S,
    ClientInfo,
    HttpRequest,
    HttpResponse,
    HttpsServer,
)


class Served:
    """A running server and what its handler saw."""

    def __init__(self, port: int, server: HttpsServer, client_ctx: ssl.SSLContext) -> None:
        self.port, self.server, self.client_ctx = port, server, client_ctx
        self.requests: list[HttpRequest] = []
        self.opened: list[trio.abc.AsyncResource] = []

    async def tcp(self, source: str | None = None) -> trio.SocketStream:
        """A client connection (from loopback address *source*), closed at the end of the
        test."""
        stream = await trio.open_tcp_stream("127.0.0.1", self.port, local_address=source)
        self.opened.append(stream)
        return stream

    async def tls(self, source: str | None = None) -> trio.SSLStream[trio.SocketStream]:
        tls = trio.SSLStream(await self.tcp(source), self.client_ctx, server_hostname="localhost")
        self.opened.append(tls)
        await tls.do_handshake()
        return tls


async def read_all(tls: trio.SSLStream[trio.SocketStream]) -> bytes:
    out = bytearray()
    try:
        while chunk := await tls.receive_some(65536):
            out += chunk
    except (trio.BrokenResourceError, ssl.SSLError):
        pass  # closed without close_notify: what arrived is the answer
    return bytes(out)


@contextlib.asynccontextmanager
async def serving(max_connections: int, max_per_source: int) -> AsyncIterator[Served]:
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    out: Served | None = None

    async def handler(request: HttpRequest, client: ClientInfo) -> HttpResponse:
        assert out is not None
        out.requests.append(request)
        return HttpResponse(200, b'{"headers": %d}' % len(request.headers))

    server = HttpsServer(
        lambda: server_ctx, handler, max_connections=max_connections, max_per_source=max_per_source
    )
    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        await nursery.start(server.serve, listeners)
        out = Served(port, server, client_ctx)
        try:
            yield out
        finally:
            for resource in reversed(out.opened):
                await trio.aclose_forcefully(resource)
            nursery.cancel_scope.cancel()


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    async with serving(max_connections=4, max_per_source=8) as out:
        yield out


async def test_a_plain_request_is_answered(served: Served) -> None:
    tls = await served.tls()
    await tls.send_all(b"GET /x HTTP/1.1\r\nhost: a\r\n\r\n")
    reply = await read_all(tls)
    assert reply.startswith(b"HTTP/1.1 200 ") and reply.endswith(b'{"headers": 1}')


@pytest.mark.parametrize(
    "head",
    [
        pytest.param(
            b"GET /" + b"a" * (MAX_HEADER_BYTES + 10) + b" HTTP/1.1\r\n", id="request line"
        ),
        pytest.param(
            b"GET / HTTP/1.1\r\nhost: a\r\nx-big: " + b"b" * (MAX_HEADER_BYTES + 10) + b"\r\n",
            id="one header",
        ),
        pytest.param(
            b"GET / HTTP/1.1\r\nhost: a\r\n" + b"x: y\r\n" * (MAX_HEADER_BYTES // 6 + 10),
            id="header count",
        ),
    ],
)
async def test_an_oversized_request_head_is_answered_431_and_never_handled(
    served: Served, head: bytes
) -> None:
    tls = await served.tls()
    with trio.fail_after(10):
        # The server may answer and close before the rest is sent.
        with contextlib.suppress(trio.BrokenResourceError):
            await tls.send_all(head + b"\r\n")
        reply = await read_all(tls)
    assert reply.startswith(b"HTTP/1.1 431 "), reply[:200]
    assert served.requests == []


async def test_many_headers_within_the_size_limit_are_served(served: Served) -> None:
    """The header count is bounded by the header size: 1500 tiny headers still fit."""
    count = 1500
    head = b"GET / HTTP/1.1\r\nhost: a\r\n" + b"".join(b"x%d: y\r\n" % i for i in range(count))
    assert len(head) < MAX_HEADER_BYTES
    tls = await served.tls()
    await tls.send_all(head + b"\r\n")
    reply = await read_all(tls)
    assert reply.startswith(b"HTTP/1.1 200 ") and reply.endswith(b'{"headers": %d}' % (count + 1))


@pytest.mark.parametrize(
    ("sent_at_once", "trickled"),
    [
        pytest.param(b"", b"GET / HTTP/1.1\r\nhost: a\r\nx-slow: " + b"z" * 100, id="headers"),
        pytest.param(
            b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 100\r\n\r\n", b"b" * 100, id="body"
        ),
    ],
)
async def test_a_trickled_request_is_cut_at_the_request_deadline(
    served: Served, autojump_clock: trio.abc.Clock, sent_at_once: bytes, trickled: bytes
) -> None:
    """Slow headers, slow body: one byte a second never completes a request in time."""
    tls = await served.tls()
    started = trio.current_time()
    closed_at = None
    if sent_at_once:
        await tls.send_all(sent_at_once)
    with trio.fail_after(REQUEST_TIMEOUT_S * 3):
        for byte in trickled:
            try:
                await tls.send_all(bytes([byte]))
            except (trio.BrokenResourceError, ssl.SSLError):
                closed_at = trio.current_time()
                break
            await trio.sleep(1.0)
    assert closed_at is not None, "the server kept a trickling client past its deadline"
    assert REQUEST_TIMEOUT_S <= closed_at - started <= REQUEST_TIMEOUT_S + 2
    assert served.requests == []


async def test_a_silent_client_is_cut_at_the_handshake_deadline(
    served: Served, autojump_clock: trio.abc.Clock
) -> None:
    stream = await served.tcp()
    started = trio.current_time()
    with trio.fail_after(HANDSHAKE_TIMEOUT_S * 3):
        data = await stream.receive_some(1024)
    assert data == b"" and trio.current_time() - started >= HANDSHAKE_TIMEOUT_S
    with trio.fail_after(1):  # counted once its connection task ends
        while served.server.statistics().failed_handshakes != 1:
            await trio.sleep(0.01)


async def test_connections_beyond_the_limit_are_closed_at_once(served: Served) -> None:
    """Connection flood: four silent connections fill the limit; the fifth is closed
    without a handshake; once one ends, the next is served."""
    silent = [await served.tcp() for _ in range(4)]
    with trio.fail_after(5):
        while served.server.statistics().open_connections < 4:
            await trio.sleep(0.01)
        extra = await served.tcp()
        assert await extra.receive_some(1024) == b""  # closed, not served
    assert served.server.statistics().refused_over_limit == 1
    await silent.pop().aclose()
    with trio.fail_after(5):
        while served.server.statistics().open_connections > 3:
            await trio.sleep(0.01)
        tls = await served.tls()
        await tls.send_all(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
        assert (await read_all(tls)).startswith(b"HTTP/1.1 200 ")


async def test_one_address_cannot_take_every_connection() -> None:
    """Connection flood from one host: its silent connections fill its own share (3), the
    next from it is closed without a handshake, and another address is still served; once
    they end, nothing about the address is kept."""
    async with serving(max_connections=8, max_per_source=3) as served:
        stats = served.server.statistics
        silent = [await served.tcp("127.0.0.1") for _ in range(3)]
        with trio.fail_after(5):
            while stats().open_connections < 3:
                await trio.sleep(0.01)
            extra = await served.tcp("127.0.0.1")
            assert await extra.receive_some(1024) == b""  # closed, not served
            assert (stats().refused_over_source_limit, stats().refused_over_limit) == (1, 0)
            tls = await served.tls("127.0.0.2")
            await tls.send_all(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
            assert (await read_all(tls)).startswith(b"HTTP/1.1 200 ")
        assert len(served.requests) == 1
        for stream in silent:
            await stream.aclose()
        with trio.fail_after(5):
            while stats().open_connections:
                await trio.sleep(0.01)
        assert stats().sources == 0  # an entry per source only while it holds connections
        with trio.fail_after(5):
            tls = await served.tls("127.0.0.1")
            await tls.send_all(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
            assert (await read_all(tls)).startswith(b"HTTP/1.1 200 ")


def test_the_cap_per_source_is_read_from_meshd_toml() -> None:
    assert parse_server_config("").server.max_connections_per_source == 32
    config = parse_server_config("[server]\nmax_connections_per_source = 4\n")
    assert config.server.max_connections_per_source == 4
    with pytest.raises(ConfigError) as info:
        parse_server_config("[server]\nmax_connections_per_source = 0\n")
    assert str(info.value).startswith("meshd.toml: server.max_connections_per_source: ")
    assert "\n" not in str(info.value)
