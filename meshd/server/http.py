"""A small HTTPS server: h11 over ``trio.SSLStream``, one request per connection.

Control-plane traffic is a few requests per host per day, so simplicity wins over
throughput: every connection does one TLS handshake (client certificate optional), reads one
request within a deadline and with bounded header and body sizes, answers with
``Connection: close`` and closes. The handler sees a frozen :class:`HttpRequest` and the
client's address and presented certificate chain; it never touches a socket.

The TLS context is fetched per connection from a callable, so the server's own certificate
can be renewed (and the trust bundle rotated) without restarting the listener.

Connections are capped in total and per source (an IPv4 address, or an IPv6 /64, as
:func:`meshd.admission.source_of` counts the agents' callers). The deadlines bound how long
one connection lasts, but before the handshake nobody is known: without a cap per source,
one host holding every slot for its 20 s would lock every agent out of the CA.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import h11
import trio

from meshd.admission import source_of
from meshd.config.server import MAX_CONNECTIONS, MAX_CONNECTIONS_PER_SOURCE
from meshd.peer import peer_chain_der
from meshd.signapi import MAX_BODY_BYTES, error_body

MAX_HEADER_BYTES = 16 * 1024
HANDSHAKE_TIMEOUT_S = 10.0
REQUEST_TIMEOUT_S = 10.0
_RECEIVE_BYTES = 16 * 1024
log = logging.getLogger("meshd.server.http")


@dataclass(frozen=True)
class HttpRequest:
    """One request; header names lower-case (the last value wins for repeated ones)."""

    method: str
    target: str
    headers: Mapping[str, str] = field(repr=False)  # may hold an Authorization secret
    body: bytes = field(repr=False)


@dataclass(frozen=True)
class HttpResponse:
    """One response."""

    status: int
    body: bytes
    content_type: str = "application/json"


@dataclass(frozen=True)
class ClientInfo:
    """Who sent the request: the TCP peer address and its TLS certificate chain (DER)."""

    address: str
    chain_der: tuple[bytes, ...]


Handler = Callable[[HttpRequest, ClientInfo], Awaitable[HttpResponse]]


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class HttpsStatistics:
    """Connection counters of an :class:`HttpsServer`."""

    open_connections: int
    accepted: int
    refused_over_limit: int
    failed_handshakes: int
    refused_over_source_limit: int
    sources: int  # sources holding a connection now


class HttpsServer:
    """Serves HTTPS with at most ``max_connections`` connections at once, and at most
    ``max_per_source`` of them from one source.

    A connection beyond either limit is closed at once, before the TLS handshake, and
    counted: the handshake and request deadlines bound how long each one lasts, the limits
    bound how many a flood can hold open, and how many of them one host can take.
    """

    def __init__(
        self,
        context: Callable[[], ssl.SSLContext],
        handler: Handler,
        *,
        max_connections: int = MAX_CONNECTIONS,
        max_per_source: int = MAX_CONNECTIONS_PER_SOURCE,
    ) -> None:
        self._context = context
        self._handler = handler
        self._limit = trio.CapacityLimiter(max_connections)
        self._max_per_source = max_per_source
        self._by_source: dict[str, int] = {}  # open connections; no entry at zero
        self._accepted = 0
        self._refused = 0
        self._refused_per_source = 0
        self._failed_handshakes = 0

    async def serve(
        self,
        listeners: list[trio.SocketListener],
        *,
        task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve on *listeners* forever (trio's accept loop survives EMFILE/ENFILE)."""
        await trio.serve_listeners(self._connection, listeners, task_status=task_status)

    async def _connection(self, stream: trio.SocketStream) -> None:
        address, source = _peer(stream)
        if not self._admit(source):
            await trio.aclose_forcefully(stream)
            return
        try:
            self._accepted += 1
            if not await _serve_connection(stream, address, self._context(), self._handler):
                self._failed_handshakes += 1
        finally:
            self._release(source)

    def _admit(self, source: str) -> bool:
        """Take a slot for a connection from *source*, or count why there is none."""
        held = self._by_source.get(source, 0)
        if held >= self._max_per_source:
            self._refused_per_source += 1
            return False
        try:
            self._limit.acquire_nowait()
        except trio.WouldBlock:
            self._refused += 1
            return False
        self._by_source[source] = held + 1
        return True

    def _release(self, source: str) -> None:
        self._limit.release()
        held = self._by_source.pop(source) - 1
        if held:
            self._by_source[source] = held  # at zero the entry is gone: the dict stays bounded

    def statistics(self) -> HttpsStatistics:
        """Open connections and counters."""
        return HttpsStatistics(
            open_connections=int(self._limit.borrowed_tokens),
            accepted=self._accepted,
            refused_over_limit=self._refused,
            failed_handshakes=self._failed_handshakes,
            refused_over_source_limit=self._refused_per_source,
            sources=len(self._by_source),
        )


def _peer(stream: trio.SocketStream) -> tuple[str, str]:
    """The client's address, and the source its connections count against."""
    try:
        peer = stream.socket.getpeername()
    except OSError:
        return "unknown", "unknown"  # reset before we looked: it fails at the handshake
    address = str(peer[0])
    return address, source_of(f"{address}:{peer[1]}")


async def _serve_connection(
    stream: trio.SocketStream, address: str, context: ssl.SSLContext, handler: Handler
) -> bool:
    """Serve one connection; False if the TLS handshake failed or timed out."""
    tls = trio.SSLStream(stream, context, server_side=True, https_compatible=True)
    client: ClientInfo | None = None
    try:
        with trio.move_on_after(HANDSHAKE_TIMEOUT_S) as scope:
            await tls.do_handshake()
        if scope.cancelled_caught:
            return False
        client = ClientInfo(address, _client_chain(tls))
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        with trio.move_on_after(REQUEST_TIMEOUT_S):
            try:
                request = await _read_request(tls, conn)
            except _BadRequest as exc:
                response = HttpResponse(exc.status, error_body(str(exc)))
            else:
                response = await _answer(handler, request, client)
            await _send_response(tls, conn, response)
    except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, OSError):
        # The client went away or failed the handshake: nothing to answer.
        return client is not None
    else:
        return True
    finally:
        await trio.aclose_forcefully(tls)


def _client_chain(tls: trio.SSLStream[trio.SocketStream]) -> tuple[bytes, ...]:
    if tls.getpeercert(binary_form=True) is None:
        return ()  # no client certificate (peer_chain_der would see [None] here)
    return peer_chain_der(tls)


async def _answer(handler: Handler, request: HttpRequest, client: ClientInfo) -> HttpResponse:
    try:
        return await handler(request, client)
    except Exception:
        # A bug answering one request must not take the CA down for every host: log it
        # with its traceback (the request's headers and body are not in it) and answer 500.
        log.exception("internal error answering %s %s", request.method, request.target[:100])
        return HttpResponse(500, error_body("internal error; see the meshd log"))


async def _read_request(
    tls: trio.SSLStream[trio.SocketStream], conn: h11.Connection
) -> HttpRequest:
    head: h11.Request | None = None
    body = bytearray()
    fed = 0  # bytes given to h11 so far
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            if exc.error_status_hint == 431:
                message = f"request head is larger than {MAX_HEADER_BYTES} bytes"
                raise _BadRequest(431, message) from None
            raise _BadRequest(exc.error_status_hint, "malformed HTTP request") from None
        if event is h11.NEED_DATA:
            # h11 bounds only what it holds of an *incomplete* head: a whole head that came
            # in one read would pass though larger than the limit. Reading at most one byte
            # past the limit before the head is complete makes the limit exact.
            room = _RECEIVE_BYTES if head is not None else MAX_HEADER_BYTES + 1 - fed
            data = bytes(await tls.receive_some(min(_RECEIVE_BYTES, room)))
            fed += len(data)
            conn.receive_data(data)
            if not data and conn.their_state is not h11.DONE:
                raise trio.BrokenResourceError("client closed before finishing its request")
        elif isinstance(event, h11.Request):
            head = event
            _check_length(event)
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_BODY_BYTES:
                raise _BadRequest(413, f"request body is larger than {MAX_BODY_BYTES} bytes")
        elif isinstance(event, h11.EndOfMessage) and head is not None:
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in head.headers}
            return HttpRequest(
                method=head.method.decode("ascii"),
                target=head.target.decode("ascii", "replace"),
                headers=MappingProxyType(headers),
                body=bytes(body),
            )
        else:
            raise trio.BrokenResourceError("connection closed")


def _check_length(request: h11.Request) -> None:
    for name, value in request.headers:
        if name.lower() == b"content-length" and int(value) > MAX_BODY_BYTES:
            raise _BadRequest(413, f"request body is larger than {MAX_BODY_BYTES} bytes")


async def _send_response(
    tls: trio.SSLStream[trio.SocketStream], conn: h11.Connection, response: HttpResponse
) -> None:
    headers = [
        ("content-type", response.content_type),
        ("content-length", str(len(response.body))),
        ("connection", "close"),
        ("cache-control", "no-store"),
    ]
    out = conn.send(h11.Response(status_code=response.status, headers=headers))
    out = (out or b"") + (conn.send(h11.Data(data=response.body)) or b"")
    out += conn.send(h11.EndOfMessage()) or b""
    await tls.send_all(out)
