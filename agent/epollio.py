"""The epoll engine's connection state and per-socket operations (engine thread only).

:mod:`agent.epollpump` runs the loop; this module holds what one pumped connection is made
of (:class:`Side`, :class:`Direction`) and the non-blocking steps on it: read (plain or
TLS), write, flush, half-close, reset, and the one-chunk fast paths. The rules (bounded
buffers, half-close over TLS, resets) are described in :mod:`agent.epollpump`. Everything
here raises ``OSError`` / ``ssl.SSLError``; the engine ends the connection.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from agent import buffers
from agent.tlsconn import read_received_records

if TYPE_CHECKING:
    from agent.epollpump import Job

RAW_BUFFER = 65536
_LINGER_RESET = struct.pack("ii", 1, 0)

# Direction states.
READING, EOF_SEEN, DONE = 0, 1, 2


class NoBIO:
    """Stands in for a plain socket's (absent) outgoing BIO: nothing is ever pending."""

    __slots__ = ()
    pending = 0


NO_BIO = NoBIO()


class Side:
    """One socket of a pumped connection, as the engine thread sees it."""

    __slots__ = (
        "drained",
        "dst_of",
        "eof_sent",
        "fd",
        "incoming",
        "job",
        "mask",
        "obj",
        "outgoing",
        "pending",
        "rbuf",
        "sock",
        "src_of",
        "ssl",
        "stash",
        "stash_end",
        "watch_ticket",
    )  # fmt: skip

    def __init__(self, sock: socket.socket, job: Job) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.job = job
        self.obj: ssl.SSLObject | None = None
        # The C object behind ``obj`` (``ssl.SSLObject._sslobj``): the fast paths call its
        # read/write/pending directly, one Python frame less each (CPython 3.11 stdlib).
        self.ssl: Any = None
        self.incoming: ssl.MemoryBIO | None = None
        self.outgoing: ssl.MemoryBIO | NoBIO = NO_BIO
        self.rbuf: memoryview | None = None
        self.stash = bytearray()
        self.stash_end: BaseException | None = None
        self.eof_sent = False
        self.watch_ticket = False  # a client session: publish its ticket (_publish_ticket)
        # Raw bytes accepted for this socket but not yet sent (a slice of a direction buffer,
        # or ciphertext taken from ``outgoing``); None when there are none.
        self.pending: memoryview | bytes | None = None
        self.drained = False  # the last read was short: wait for epoll before reading again
        self.mask = 0  # what the engine's epoll has registered for this fd (0: not registered)
        self.src_of: Direction  # set by Job
        self.dst_of: Direction

    def has_output(self) -> bool:
        return self.pending is not None or self.outgoing.pending > 0

    def has_buffered_input(self) -> bool:
        if self.stash or self.stash_end is not None:
            return True
        obj, incoming = self.obj, self.incoming
        if obj is None or incoming is None:
            return False
        return incoming.pending > 0 or obj.pending() > 0


class Direction:
    """Bytes from ``src`` to ``dst`` through one fixed buffer."""

    __slots__ = ("count", "dst", "fast", "src", "state", "view")

    def __init__(self, src: Side, dst: Side, buffer_size: int) -> None:
        self.src = src
        self.dst = dst
        self.view = memoryview(
            buffers.take() if buffer_size == buffers.SIZE else bytearray(buffer_size)
        )
        self.count = 0
        self.state = READING
        # The one-chunk fast path for this pair of socket kinds (see _fast_plain_plain).
        self.fast: Callable[[Direction], bool] | None = None


SESSION_KEY = "_meshd_published_session"


class EngineOwnedSSLObject(ssl.SSLObject):
    """A client ``SSLObject`` pumped by the engine: ``session`` is a published snapshot.

    The TLS session cache (``agent.tlssessions``) reads ``.session`` of live outbound
    connections from the trio thread to harvest TLS 1.3 tickets. With the engine, the same
    ``SSL`` is in ``SSL_read`` on the engine thread (GIL released), and OpenSSL replaces its
    session on a NewSessionTicket without the lock ``SSL_get1_session`` takes: reading it
    from trio could race. So the engine reads the session itself after its reads and
    publishes it here; the trio thread only ever sees that snapshot.
    """

    @property
    def session(self) -> ssl.SSLSession | None:
        """The last session the engine published (the handover-time one at first)."""
        published: ssl.SSLSession | None = self.__dict__.get(SESSION_KEY)
        return published

    @session.setter
    def session(self, value: ssl.SSLSession | None) -> None:
        raise ValueError("cannot set the session of an established, engine-owned connection")


# ---------------------------------------------------------------- per-socket primitives
# Engine thread only. They raise OSError / ssl.SSLError; the caller ends the connection.


def read(src: Side, view: memoryview) -> int | None:
    """Read into ``view``: the count, 0 at EOF, None when nothing is available now."""
    if src.obj is not None:
        return _read_tls(src, src.obj, view)
    if src.drained:
        return None
    try:
        n = src.sock.recv_into(view)
    except BlockingIOError:
        src.drained = True
        return None
    src.drained = n < len(view)
    return n


def _read_tls(src: Side, obj: ssl.SSLObject, view: memoryview) -> int | None:
    if src.stash or src.stash_end is not None:
        return _take_stash(src, view)
    incoming = cast(ssl.MemoryBIO, src.incoming)
    while True:
        if incoming.pending or obj.pending() or incoming.eof:
            n = _decrypt(src, obj, view)
            if n is not None:
                return n
        if src.drained:
            return None
        rbuf = cast(memoryview, src.rbuf)
        try:
            m = src.sock.recv_into(rbuf)
        except BlockingIOError:
            src.drained = True
            return None
        src.drained = m < len(rbuf)
        if m:
            incoming.write(rbuf[:m])
        else:
            incoming.write_eof()


def _decrypt(src: Side, obj: ssl.SSLObject, view: memoryview) -> int | None:
    """One ``SSL_read``: the count, 0 at ``close_notify``, None when it needs more bytes."""
    try:
        # typeshed: bytearray -> bytes; really any writable buffer, returning a count.
        n = cast(int, obj.read(len(view), view))  # type: ignore[arg-type]
    except ssl.SSLWantReadError:
        if cast(ssl.MemoryBIO, src.incoming).eof:
            raise ConnectionResetError("TLS peer closed mid-record") from None
        return None
    except ssl.SSLZeroReturnError:
        return 0
    except ssl.SSLEOFError as exc:
        raise ConnectionResetError("TLS peer closed without close_notify") from exc
    if src.watch_ticket:
        _publish_ticket(src)
    if src.has_output():
        flush(src)  # post-handshake replies (e.g. a TLS 1.3 KeyUpdate)
    return n


def _publish_ticket(side: Side) -> None:
    """Engine thread, after a read: publish the client session once it holds a ticket."""
    session = side.ssl.session
    if session is not None and session.has_ticket:
        cast(ssl.SSLObject, side.obj).__dict__[SESSION_KEY] = session
        side.watch_ticket = False


# ---------------------------------------------------------------- fast paths
# One chunk for the common case (an EPOLLIN on a direction that reads, nothing pending):
# read once, pass it on, and return True when that is all there is to do (the socket was
# drained, everything was sent, epoll's interest stays as it is). Anything else (EOF, a
# full buffer, a partial send, a partial TLS record left over) leaves consistent state and
# returns False, and the general path (_run_direction, then _settle) takes over from there.


def _recv_short(src: Side, buf: memoryview) -> int:
    """``recv_into``; -1 when nothing was there. Sets ``drained`` after a short read."""
    try:
        n = src.sock.recv_into(buf)
    except BlockingIOError:
        src.drained = True
        return -1
    src.drained = 0 < n < len(buf)
    return n


def _send_some(dst: Side, data: memoryview | bytes) -> bool:
    """Send; keep what did not go as ``dst.pending``; True when all went."""
    try:
        sent = dst.sock.send(data)
    except BlockingIOError:
        sent = 0
    if sent == len(data):
        return True
    dst.pending = memoryview(data)[sent:]
    return False


def _fast_plain_plain(d: Direction) -> bool:
    src, dst, view = d.src, d.dst, d.view
    if dst.pending is not None:
        return False
    n = _recv_short(src, view)
    if n <= 0:
        return n < 0  # EAGAIN: nothing to do; EOF: the general path reads it again
    d.count += n
    return _send_some(dst, view[:n]) and src.drained


def _fast_plain_tls(d: Direction) -> bool:
    src, dst, view = d.src, d.dst, d.view
    out = dst.outgoing
    if dst.pending is not None or out.pending:
        return False
    n = _recv_short(src, view)
    if n <= 0:
        return n < 0
    d.count += n
    try:
        dst.ssl.write(view[:n])
    except ssl.SSLWantReadError:
        raise ssl.SSLError("TLS renegotiation is not supported by the pump engine") from None
    return _send_some(dst, cast(ssl.MemoryBIO, out).read()) and src.drained


def _fast_tls_plain(d: Direction) -> bool:
    src, dst, view = d.src, d.dst, d.view
    obj, incoming = src.ssl, cast(ssl.MemoryBIO, src.incoming)
    if (
        dst.pending is not None
        or src.stash
        or src.stash_end is not None
        or incoming.pending  # left over: the general path decrypts it first
        or obj.pending()
    ):
        return False
    rbuf = cast(memoryview, src.rbuf)
    m = _recv_short(src, rbuf)
    if m <= 0:
        return m < 0
    incoming.write(rbuf[:m])
    while incoming.pending or obj.pending():
        try:
            n = obj.read(len(view), view)
        except ssl.SSLWantReadError:
            break  # the rest of a record is still on its way
        except ssl.SSLZeroReturnError:
            n = 0
        except ssl.SSLEOFError as exc:
            raise ConnectionResetError("TLS peer closed without close_notify") from exc
        if not n:  # the peer's close_notify (SSLZeroReturnError once ours went out too)
            d.state = EOF_SEEN
            return False
        if src.watch_ticket:  # before the bytes go on: whoever sees them sees the ticket
            _publish_ticket(src)
        d.count += n
        if not _send_some(dst, view[:n]):
            return False
    if src.outgoing.pending:
        flush(src)  # post-handshake replies (e.g. a TLS 1.3 KeyUpdate)
        return False
    return src.drained


FAST_PATHS: dict[tuple[bool, bool], Callable[[Direction], bool] | None] = {
    (False, False): _fast_plain_plain,
    (False, True): _fast_plain_tls,
    (True, False): _fast_tls_plain,
    (True, True): None,
}


def _take_stash(src: Side, view: memoryview) -> int:
    n = min(len(view), len(src.stash))
    if n:
        view[:n] = src.stash[:n]
        del src.stash[:n]
        return n
    end = src.stash_end
    if isinstance(end, EOFError):
        return 0
    src.stash_end = None
    assert end is not None
    raise end


def write(dst: Side, data: memoryview) -> bool:
    """Accept ``data`` for ``dst``; True when it all went out, False when some is pending."""
    obj = dst.obj
    if obj is None:
        try:
            n = dst.sock.send(data)
        except BlockingIOError:
            n = 0
        if n == len(data):
            return True
        dst.pending = data[n:]  # a slice of the direction's buffer: reading waits for it
        return False
    try:
        obj.write(data)  # a MemoryBIO takes everything
    except ssl.SSLWantReadError:
        raise ssl.SSLError("TLS renegotiation is not supported by the pump engine") from None
    return flush(dst)


def flush(side: Side) -> bool:
    """Send ``side``'s unsent bytes; True when none are left."""
    sock, out = side.sock, side.outgoing
    while True:
        data = side.pending
        if data is None:
            if not out.pending:
                return True
            data = cast(ssl.MemoryBIO, out).read()
        try:
            n = sock.send(data)
        except BlockingIOError:
            n = 0
        if n == len(data):
            side.pending = None
            continue
        side.pending = memoryview(data)[n:]
        return False


def send_eof(dst: Side) -> None:
    """Half-close ``dst``'s sending direction: FIN, or ``close_notify`` for TLS."""
    obj = dst.obj
    if obj is None:
        try:
            dst.sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            raise ConnectionResetError(f"half-close failed: {exc}") from exc
        return
    if dst.eof_sent:
        return
    dst.eof_sent = True
    _stash_undelivered(dst)
    # close_notify is queued by the first SSL_shutdown; only reading the peer's can fail.
    with contextlib.suppress(ssl.SSLWantReadError, ssl.SSLEOFError):
        obj.unwrap()
    flush(dst)


def _stash_undelivered(side: Side) -> None:
    """Decrypt every record already received so ``SSL_shutdown`` cannot read one."""
    if side.stash_end is None:
        obj, incoming = cast(ssl.SSLObject, side.obj), cast(ssl.MemoryBIO, side.incoming)
        side.stash_end = read_received_records(obj, incoming, side.stash)


def reset(sock: socket.socket) -> None:
    """Close with a TCP RST (SO_LINGER 0)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    sock.close()


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
