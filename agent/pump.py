"""The L4 byte pump: copy both directions between two connections until both are done.

Design note (measurements in docs/adr/003-fast-tls-pump.md):

* One task per direction, one fixed buffer per direction (``recv_into`` + ``memoryview``), so
  memory per connection is bounded and a chunk is one read and one write, no allocation.
* Connections try the syscall first and park on trio's readiness only when it would block.
  A direction that never blocks yields every ``_CHECKPOINT_EVERY`` chunks (about 1 MiB of
  bulk data, or 16 small requests) so it cannot starve other connections, and so
  cancellation is seen promptly.
* Half-close: EOF read from one side is passed on as ``send_eof()`` (TCP ``SHUT_WR``, or TLS
  ``close_notify``) and the other direction keeps running.
* Idle timeout without per-chunk timer work: directions only bump byte counters; a watcher
  wakes every quarter of the timeout and cancels when the counters have not moved for a whole
  timeout. The timeout thus fires between ``idle_timeout`` and ``1.25 * idle_timeout`` after
  the last byte moved.
* Teardown: a clean end closes both sockets normally; a reset, error or idle timeout resets
  both (RST), so an abortive close on one side stays abortive on the other.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from typing import Literal, Protocol

import trio

from agent.tlsconn import abort_socket, close_socket, send_all_raw

Outcome = Literal["closed", "idle_timeout", "reset", "error"]

_CHECKPOINT_EVERY = 16
# The idle watcher looks this many times per timeout (sets the timeout's precision).
_IDLE_TICKS = 4


class Connection(Protocol):
    """What the pump needs from one side: :class:`PlainConnection` or ``TLSConnection``."""

    async def recv_into(self, buf: memoryview) -> int:
        """Read into ``buf``; return the count, 0 at EOF."""

    async def send_all(self, data: memoryview | bytes) -> None:
        """Write all of ``data``."""

    async def send_eof(self) -> None:
        """Half-close the sending direction."""

    def close(self) -> None:
        """Close normally."""

    def abort(self) -> None:
        """Close with a reset."""


class PumpFunction(Protocol):
    """What proxies call to pump a connection: :func:`pump` or ``PumpEngine.pump``."""

    async def __call__(self, a: Connection, b: Connection, *, idle_timeout: float) -> PumpResult:
        """Copy both ways until both directions end; close both (see :func:`pump`)."""


@dataclass(frozen=True)
class PumpResult:
    """What one pumped connection did; one access-log line's worth."""

    bytes_a_to_b: int
    bytes_b_to_a: int
    outcome: Outcome
    duration: float
    detail: str = ""


class PlainConnection:
    """A plaintext TCP (or Unix) socket with the pump's connection interface."""

    def __init__(self, sock: socket.socket) -> None:
        """Take ownership of ``sock``: made non-blocking, with TCP_NODELAY for TCP."""
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock = sock
        # See TLSConnection: after a short read, wait for readiness before the next read.
        self._drained = False

    def fileno(self) -> int:
        """The socket's file descriptor."""
        return self._sock.fileno()

    def hand_over(self) -> socket.socket:
        """Give the socket to another owner (the epoll pump engine); do not use this after."""
        return self._sock

    async def recv_into(self, buf: memoryview) -> int:
        """Read into ``buf``; 0 at EOF. Raises ``ConnectionResetError`` on RST."""
        if self._drained:
            await trio.lowlevel.wait_readable(self._sock)
        while True:
            try:
                n = self._sock.recv_into(buf)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self._sock)
                continue
            self._drained = n < len(buf)
            return n

    async def send_all(self, data: memoryview | bytes) -> None:
        """Write all of ``data``, waiting while the socket buffer is full."""
        await send_all_raw(self._sock, data)

    async def send_eof(self) -> None:
        """Send FIN (``shutdown(SHUT_WR)``); reading continues."""
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            raise ConnectionResetError(f"half-close failed: {exc}") from exc

    def close(self) -> None:
        """Close normally (FIN)."""
        close_socket(self._sock)

    def abort(self) -> None:
        """Close with a TCP RST."""
        abort_socket(self._sock)


class _Progress:
    """Mutable per-pump counters shared by the two directions and the idle watcher."""

    __slots__ = ("a_to_b", "b_to_a", "detail", "outcome")

    def __init__(self) -> None:
        self.a_to_b = 0
        self.b_to_a = 0
        self.outcome: Outcome = "closed"
        self.detail = ""

    def total(self) -> int:
        return self.a_to_b + self.b_to_a

    def fail(self, outcome: Outcome, detail: str) -> None:
        """Record the first failure; later ones are consequences of it."""
        if self.outcome == "closed":
            self.outcome = outcome
            self.detail = detail


async def pump(
    a: Connection, b: Connection, *, idle_timeout: float, buffer_size: int = 65536
) -> PumpResult:
    """Copy bytes both ways between ``a`` and ``b`` until both directions end; close both.

    Args:
        a: one side (e.g. the accepted application connection); owned and closed by the pump.
        b: the other side (e.g. the upstream mTLS connection); owned and closed by the pump.
        idle_timeout: seconds without a byte moving in either direction before giving up.
        buffer_size: bytes per direction's buffer.

    Returns:
        Byte counts, the outcome (``closed`` when both sides reached EOF, ``idle_timeout``,
        ``reset`` when a peer reset or truncated, ``error`` for anything else such as a TLS
        protocol error) and the duration. Peer failures are results, not exceptions;
        cancellation from outside still propagates (after both sockets are reset).
    """
    progress = _Progress()
    start = trio.current_time()
    clean = False
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watch_idle, progress, idle_timeout, nursery.cancel_scope)
            async with trio.open_nursery() as directions:
                for src, dst, forward in ((a, b, True), (b, a, False)):
                    directions.start_soon(
                        _copy, src, dst, bytearray(buffer_size), progress, forward,
                        directions.cancel_scope,
                    )  # fmt: skip
            nursery.cancel_scope.cancel()  # both directions done: stop the watcher
        clean = progress.outcome == "closed"
    finally:
        for conn in (a, b):
            if clean:
                conn.close()
            else:
                conn.abort()
    return PumpResult(
        bytes_a_to_b=progress.a_to_b,
        bytes_b_to_a=progress.b_to_a,
        outcome=progress.outcome,
        duration=trio.current_time() - start,
        detail=progress.detail,
    )


async def _copy(
    src: Connection,
    dst: Connection,
    buf: bytearray,
    progress: _Progress,
    forward: bool,
    both: trio.CancelScope,
) -> None:
    """One direction: read, write, count; EOF becomes ``send_eof``; a failure ends both."""
    view = memoryview(buf)
    chunks = 0
    try:
        while n := await src.recv_into(view):
            await dst.send_all(view[:n])
            if forward:
                progress.a_to_b += n
            else:
                progress.b_to_a += n
            chunks += 1
            if chunks == _CHECKPOINT_EVERY:
                chunks = 0
                await trio.lowlevel.checkpoint()
        await dst.send_eof()
    except (ConnectionError, ssl.SSLEOFError) as exc:
        progress.fail("reset", _describe(exc))
        both.cancel()
    except (OSError, ssl.SSLError) as exc:
        progress.fail("error", _describe(exc))
        both.cancel()


async def _watch_idle(progress: _Progress, idle_timeout: float, scope: trio.CancelScope) -> None:
    """Cancel ``scope`` once no byte has moved for ``idle_timeout`` seconds."""
    seen = progress.total()
    quiet_ticks = 0
    while quiet_ticks < _IDLE_TICKS:
        await trio.sleep(idle_timeout / _IDLE_TICKS)
        total = progress.total()
        quiet_ticks = quiet_ticks + 1 if total == seen else 0
        seen = total
    progress.fail("idle_timeout", f"no bytes moved for {idle_timeout}s")
    scope.cancel()


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
