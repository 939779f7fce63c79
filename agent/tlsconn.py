"""Mutual-TLS connections for the byte pump, driven directly on trio's I/O readiness.

Design note (see docs/adr/003-fast-tls-pump.md for measurements):

* ``ssl.SSLObject`` over two ``MemoryBIO``\\ s, with the raw socket read and written by us in
  non-blocking mode. We try the syscall first and only park on
  ``trio.lowlevel.wait_readable``/``wait_writable`` when it would block, so a chunk costs a few
  C calls and no scheduler round trip. ``trio.SSLStream``'s retry loop, conflict detectors and
  per-call checkpoints are gone.
* Why not ``ssl.SSLSocket`` (OpenSSL reading the fd itself, no BIO copy)? Because half-close
  cannot be done with it on Python 3.11: ``SSLSocket.unwrap()`` calls ``SSL_shutdown`` twice and
  the second call reads the socket; application data already in flight from the peer then
  fails the connection with ``APPLICATION_DATA_AFTER_CLOSE_NOTIFY``. With BIOs we decide what
  the second call can see: nothing (undelivered records are decrypted into a stash first).
* Half-close: ``send_eof()`` sends ``close_notify`` and keeps the read side open; the peer's
  ``close_notify`` reads as EOF (0). A TCP EOF without ``close_notify`` is a truncation and is
  reported as ``ConnectionResetError``, so an abortive close stays abortive across the mesh.
* One task may read while another writes (the pump's two directions). The raw socket's read
  side and write side each have a :class:`_Turn` so that rare cross-direction needs (a write
  that wants to read, a read that must flush a post-handshake reply) never wait twice on one fd.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
from typing import NamedTuple, cast

import trio

from agent import buffers
from meshd.errors import MeshdError
from meshd.peer import peer_chain_der

_RAW_BUFFER = 65536
# SO_LINGER on, timeout 0: close() sends RST instead of FIN.
_LINGER_RESET = struct.pack("ii", 1, 0)


class TLSHandshakeError(MeshdError):
    """The TLS handshake failed, timed out or the peer went away during it."""


class _Turn:
    """Lets one task at a time use one side of a socket; free use costs no checkpoint."""

    __slots__ = ("_ended", "busy")

    def __init__(self) -> None:
        self.busy = False
        self._ended: trio.Event | None = None

    async def wait_until_free(self) -> None:
        """Wait until the task holding the turn releases it."""
        if self._ended is None:
            self._ended = trio.Event()
        await self._ended.wait()

    def release(self) -> None:
        """End the current turn and wake any waiters."""
        self.busy = False
        if self._ended is not None:
            self._ended.set()
            self._ended = None


def abort_socket(sock: socket.socket) -> None:
    """Close ``sock`` with a TCP RST (best effort) and tell trio the fd is going away."""
    if sock.fileno() < 0:
        return
    with contextlib.suppress(OSError):  # already dead: close() below is all we can do
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    trio.lowlevel.notify_closing(sock)
    sock.close()


def close_socket(sock: socket.socket) -> None:
    """Close ``sock`` normally (FIN) and tell trio the fd is going away."""
    if sock.fileno() < 0:
        return
    trio.lowlevel.notify_closing(sock)
    sock.close()


class TLSState(NamedTuple):
    """A TLS session's state after the handshake, as :meth:`TLSConnection.hand_over` gives it.

    ``incoming`` may hold received ciphertext and ``outgoing`` unsent ciphertext; ``stash``
    holds plaintext decrypted early by ``send_eof`` and ``stash_end`` what ended it.
    """

    sock: socket.socket
    obj: ssl.SSLObject
    incoming: ssl.MemoryBIO
    outgoing: ssl.MemoryBIO
    stash: bytearray
    stash_end: BaseException | None
    eof_sent: bool
    rbuf: memoryview  # the socket read buffer (an ``agent.buffers`` buffer), reused


class TLSConnection:
    """A TLS session over a non-blocking socket, with the pump's connection interface.

    Create it with :func:`handshake`. Methods are not safe for two tasks reading at once or two
    tasks writing at once; one reader plus one writer is the supported (pump) pattern.
    """

    def __init__(self, sock: socket.socket, obj: ssl.SSLObject, incoming: ssl.MemoryBIO,
                 outgoing: ssl.MemoryBIO) -> None:  # fmt: skip
        self._raw = sock
        self._obj = obj
        self._in = incoming
        self._out = outgoing
        self._rbuf = memoryview(buffers.take())  # goes on to the engine at hand-over
        self._rx = _Turn()
        self._tx = _Turn()
        # The last socket read came back short: the kernel buffer was empty, so the next read
        # waits for readiness first instead of paying for an EAGAIN round.
        self._raw_drained = False
        self._eof_sent = False
        # Plaintext decrypted early by send_eof() and the error/EOF that ended it, if any.
        self._stash = bytearray()
        self._stash_end: BaseException | None = None
        # Whether someone will read this (client) connection's session for its ticket
        # (the session cache); the epoll engine publishes it only then.
        self.harvest_ticket = True

    def fileno(self) -> int:
        """The raw socket's file descriptor."""
        return self._raw.fileno()

    def peer_chain_der(self) -> tuple[bytes, ...]:
        """The certificates the peer presented as DER, leaf first (see
        :func:`meshd.peer.peer_chain_der`).

        The whole presented chain, not just the leaf: during a root rotation a peer's leaf
        comes from a signing CA our bundle may not list yet, and only the chain it presents
        (signing CA plus cross certificate) connects it to a root we trust. A resumed
        session may carry no chain; then the leaf alone (the bundle supplies the rest).
        """
        chain = peer_chain_der(self._obj)
        if chain:
            return chain
        leaf = self._obj.getpeercert(binary_form=True)
        return (leaf,) if leaf else ()

    def version(self) -> str | None:
        """The negotiated protocol version, e.g. ``"TLSv1.3"``."""
        return self._obj.version()

    @property
    def alpn(self) -> str | None:
        """The application protocol both sides agreed on (ALPN), or None."""
        return self._obj.selected_alpn_protocol()

    async def wait_readable(self) -> None:
        """Wait until the raw socket has something to read (or was closed)."""
        await trio.lowlevel.wait_readable(self._raw)

    def still_idle(self) -> bool:
        """For a connection nobody uses yet: take in what arrived, without waiting.

        TLS 1.3 session tickets arrive after the handshake and are absorbed here. Returns
        False if the peer closed, reset or sent application data (which an idle peer never
        does); the connection is then useless and should be closed.
        """
        if self._stash or self._stash_end is not None:
            return False
        while True:
            try:
                n = self._raw.recv_into(self._rbuf)
            except BlockingIOError:
                break
            except OSError:
                return False
            if not n:
                self._in.write_eof()
                break
            self._in.write(self._rbuf[:n])  # and read on: a reset may follow the data
        self._raw_drained = True
        if not (self._in.pending or self._in.eof or self._obj.pending()):
            return True
        try:
            self._obj.read(1)
        except ssl.SSLWantReadError:
            return not self._in.eof
        except (ssl.SSLError, OSError):
            return False
        return False  # application data from an idle peer

    @property
    def session_reused(self) -> bool:
        """True if the handshake resumed the session offered to :func:`handshake`."""
        return self._obj.session_reused

    @property
    def ssl_object(self) -> ssl.SSLObject:
        """The underlying ``SSLObject``, for reading its ``session`` (client side).

        TLS 1.3 tickets arrive after the handshake and are taken in by the first reads, so
        ``ssl_object.session`` gains a ticket only once data has been received. Never read or
        write through it: the connection owns its state.
        """
        return self._obj

    def hand_over(self) -> TLSState:
        """Give the session, with any bytes already buffered, to another owner (the epoll
        pump engine). Do not use this connection afterwards."""
        return TLSState(self._raw, self._obj, self._in, self._out, self._stash,
                        self._stash_end, self._eof_sent, self._rbuf)  # fmt: skip

    async def recv_into(self, buf: memoryview) -> int:
        """Read decrypted bytes into ``buf``; return how many, 0 at the peer's ``close_notify``.

        Raises:
            ConnectionResetError: the peer closed TCP without ``close_notify`` or reset it.
            ssl.SSLError: the peer sent something that is not valid TLS for this session.
        """
        if self._stash or self._stash_end is not None:
            return self._take_stash(buf)
        while True:
            if not (self._in.pending or self._in.eof or self._obj.pending()):
                # SSL_read could only say SSLWantReadError, whose creation costs ~3 µs.
                await self._fill()
            try:
                # typeshed: bytearray -> bytes; really any writable buffer, returning a count.
                n = cast(int, self._obj.read(len(buf), buf))  # type: ignore[arg-type]
            except ssl.SSLWantReadError:
                continue  # part of a record: fill again
            except ssl.SSLZeroReturnError:
                return 0  # close_notify after our own: CPython raises instead of returning 0
            except ssl.SSLEOFError as exc:
                raise ConnectionResetError("TLS peer closed without close_notify") from exc
            if self._out.pending:
                await self._flush()  # post-handshake replies (e.g. a TLS 1.3 KeyUpdate)
            return n

    async def send_all(self, data: memoryview | bytes) -> None:
        """Encrypt and send all of ``data``, waiting while the socket is full."""
        view = memoryview(data)
        while view:
            try:
                n = self._obj.write(view)
            except ssl.SSLWantReadError:
                # Not in TLS 1.3 with renegotiation off, but let the reader make progress.
                await self._flush()
                await self._fill()
                continue
            view = view[n:]
            await self._flush()

    async def send_eof(self) -> None:
        """Half-close: send ``close_notify``; reading continues until the peer's arrives.

        Idempotent. ``SSL_shutdown`` is called twice by CPython and the second call reads; any
        record it could see is decrypted into a stash first, so no data is lost or rejected.
        """
        if self._eof_sent:
            return
        self._eof_sent = True
        self._stash_undelivered()
        # close_notify is queued by the first SSL_shutdown; only reading the peer's can fail.
        with contextlib.suppress(ssl.SSLWantReadError, ssl.SSLEOFError):
            self._obj.unwrap()
        await self._flush()

    def close(self) -> None:
        """Close the socket (FIN). Call :meth:`send_eof` first for a clean TLS close."""
        close_socket(self._raw)

    def abort(self) -> None:
        """Close the socket with a TCP RST."""
        abort_socket(self._raw)

    async def handshake(self, timeout: float) -> None:
        """Run the TLS handshake to completion; see the module-level :func:`handshake`."""
        with trio.fail_after(timeout):
            while True:
                try:
                    self._obj.do_handshake()
                except ssl.SSLWantReadError:
                    await self._flush()
                    await self._fill()
                    continue
                await self._flush()  # our Finished / the server's session tickets
                return

    def _take_stash(self, buf: memoryview) -> int:
        n = min(len(buf), len(self._stash))
        if n:
            buf[:n] = self._stash[:n]
            del self._stash[:n]
            return n
        end, self._stash_end = self._stash_end, None
        if isinstance(end, EOFError):
            self._stash_end = end  # stays at EOF
            return 0
        assert end is not None
        raise end

    def _stash_undelivered(self) -> None:
        """Decrypt every record already received so ``SSL_shutdown`` cannot read one."""
        if self._stash_end is None:
            self._stash_end = read_received_records(self._obj, self._in, self._stash)

    async def _fill(self) -> None:
        """Move one read's worth of bytes from the socket into the incoming BIO."""
        if self._rx.busy:
            await self._rx.wait_until_free()  # the other task is filling; the caller retries
            return
        self._rx.busy = True
        try:
            if self._raw_drained:
                await trio.lowlevel.wait_readable(self._raw)
            while True:
                try:
                    n = self._raw.recv_into(self._rbuf)
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(self._raw)
                    continue
                self._raw_drained = n < len(self._rbuf)
                if n:
                    self._in.write(self._rbuf[:n])
                else:
                    self._in.write_eof()
                return
        finally:
            self._rx.release()

    async def _flush(self) -> None:
        """Send everything in the outgoing BIO, in order, even with two tasks flushing."""
        while self._out.pending:
            if self._tx.busy:
                await self._tx.wait_until_free()
                continue
            self._tx.busy = True
            try:
                await send_all_raw(self._raw, self._out.read())
            finally:
                self._tx.release()


def read_received_records(
    obj: ssl.SSLObject, incoming: ssl.MemoryBIO, into: bytearray
) -> BaseException | None:
    """Decrypt every record already received into *into*, without reading the socket.

    Called before sending ``close_notify``: OpenSSL's shutdown would otherwise read (and
    drop) application data the peer sent first. Shared by the trio and epoll engines.

    Returns:
        How the peer's stream ended, if it did: ``EOFError`` for its close_notify,
        ``ConnectionResetError`` for a close without one, or the TLS error; None while
        it goes on (or only part of a record has arrived).
    """
    while incoming.pending or obj.pending():
        try:
            data = obj.read(_RAW_BUFFER)
        except ssl.SSLWantReadError:
            return None  # only part of a record is left; shutdown's read will want more
        except ssl.SSLZeroReturnError:
            data = b""
        except ssl.SSLEOFError as exc:
            reset = ConnectionResetError("TLS peer closed without close_notify")
            reset.__cause__ = exc
            return reset
        except ssl.SSLError as exc:
            return exc
        if not data:
            return EOFError()  # the peer's close_notify: EOF after what was stashed
        into += data
    return None


async def send_all_raw(sock: socket.socket, data: memoryview | bytes) -> None:
    """Send all of ``data`` on a non-blocking socket: syscall first, wait only when full."""
    try:
        n = sock.send(data)
    except BlockingIOError:
        n = 0
    if n == len(data):
        return
    view = memoryview(data)[n:]
    while view:
        await trio.lowlevel.wait_writable(sock)
        try:
            view = view[sock.send(view) :]
        except BlockingIOError:
            continue


async def handshake(
    sock: socket.socket,
    ctx: ssl.SSLContext,
    *,
    server_side: bool,
    server_hostname: str | None = None,
    timeout: float,
    session: ssl.SSLSession | None = None,
) -> TLSConnection:
    """Run a TLS handshake on a connected socket and return the session.

    The socket is made non-blocking and owned by the result; on failure it is closed (RST).
    Peer identity (SPIFFE) is the caller's job, using :meth:`TLSConnection.peer_chain_der`,
    before any application byte moves: this function only runs ``ctx``'s own verification.

    Args:
        sock: a connected stream socket (``socket.socket``; a trio socket can be converted
            with ``socket.socket(fileno=trio_sock.detach())``).
        ctx: the TLS context; for mTLS both sides use ``CERT_REQUIRED``. A client context
            for SPIFFE certificates has ``check_hostname`` off.
        server_side: True to accept, False to connect.
        server_hostname: the SNI to send (client side only).
        timeout: seconds the whole handshake may take.
        session: a session from an earlier connection made with the same ``ctx`` to the
            same server, to resume (client side only). The server may decline it, and then
            a full handshake runs: see :attr:`TLSConnection.session_reused`. Python refuses
            (``ValueError``) a session that belongs to another context.

    Raises:
        TLSHandshakeError: verification failed, the peer went away, or the timeout expired.
    """
    sock.setblocking(False)
    _set_nodelay(sock)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    try:
        obj = ctx.wrap_bio(incoming, outgoing, server_side=server_side,
                           server_hostname=server_hostname, session=session)  # fmt: skip
    except BaseException:  # e.g. ValueError: a session of another context
        abort_socket(sock)
        raise
    conn = TLSConnection(sock, obj, incoming, outgoing)
    peer = _peer_name(sock)
    try:
        await conn.handshake(timeout)
    except trio.TooSlowError as exc:
        conn.abort()
        raise TLSHandshakeError(f"TLS handshake with {peer} timed out after {timeout}s") from exc
    except (ssl.SSLError, OSError) as exc:
        conn.abort()
        raise TLSHandshakeError(f"TLS handshake with {peer} failed: {_reason(exc)}") from exc
    except BaseException:
        conn.abort()
        raise
    return conn


def _reason(exc: ssl.SSLError | OSError) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"{exc.reason}: {exc.verify_message}"
    return getattr(exc, "reason", None) or exc.strerror or str(exc) or type(exc).__name__


def _set_nodelay(sock: socket.socket) -> None:
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _peer_name(sock: socket.socket) -> str:
    try:
        addr = sock.getpeername()
    except OSError:
        return "peer"
    if isinstance(addr, tuple):
        return f"{addr[0]}:{addr[1]}"
    return str(addr) or "peer"
