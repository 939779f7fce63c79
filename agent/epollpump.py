"""The epoll pump engine: the L4 byte pump's per-chunk work on a dedicated ``select.epoll`` thread.

Design note (measurements and the decision in docs/adr/003-fast-tls-pump.md):

* Why: a trio wakeup costs ~70-90 µs of CPU on this machine kind against ~20-30 µs for a bare
  epoll loop, and an L4 proxy needs two wakeups per request. trio keeps accept, connect,
  handshake, SPIFFE verification, policy and logging; once a connection is established,
  :meth:`PumpEngine.pump` hands both sockets (and a TLS side's ``SSLObject``, BIOs and any
  buffered bytes) to one engine thread that copies bytes until both directions end.
  ``await engine.pump(a, b, idle_timeout=...)`` is a drop-in for :func:`agent.pump.pump`:
  the same ``PumpResult``, half-close, reset and idle-timeout semantics.
* Handoff that cannot hang: the trio thread never blocks on the engine. Registrations and
  aborts go through a ``collections.deque`` (append/popleft are atomic) plus a non-blocking
  ``eventfd`` write; results come back with ``TrioToken.run_sync_soon`` (thread-safe, never
  blocks). The engine never waits on trio. Any unexpected exception for one connection ends
  that connection only (outcome ``error``); if the loop itself dies, every connection is
  aborted and every waiter released. Cancellation in trio (policy, drain deadline) queues an
  abort; the engine resets both sockets and confirms, and ``pump()`` re-raises the
  cancellation (it waits for the confirmation at most ``_ABORT_WAIT`` seconds, shielded).
* The loop is level-triggered. Each socket is registered for ``EPOLLIN`` while the direction
  it feeds may read (not ended, destination not backed up) and for ``EPOLLOUT`` only while it
  has unsent output; a socket that wants nothing is unregistered (so ``EPOLLHUP`` of a
  finished socket cannot spin the loop). After a short read the next read waits for epoll
  instead of paying for an ``EAGAIN``; level triggering means no readiness is ever lost.
* Bounded memory: one buffer per direction; a direction stops reading while its destination
  has unsent bytes (at most one chunk, or its ciphertext); a TLS source holds at most one
  socket read of ciphertext in its BIO (plus, after ``close_notify`` was sent, the records
  decrypted early into a stash, as ``TLSConnection.send_eof`` does). A direction reads at
  most ``_BUDGET`` chunks per wakeup, so one bulk stream cannot starve the others.
* TLS: the same rules as :class:`agent.tlsconn.TLSConnection`. Plaintext EOF becomes
  ``close_notify`` (after decrypting records already received, so ``SSL_shutdown`` cannot
  see application data); the peer's ``close_notify`` reads as EOF; a TCP EOF without it, and
  any RST, is a reset. A reset, error, idle timeout or abort closes both sockets with RST.
* Idle timeout: as in :mod:`agent.pump`, a timer looks at the byte counters four times per
  timeout and ends the connection after a whole timeout without progress (1.0-1.25x). The
  engine uses the monotonic clock (not trio's).
* Cross-thread rule: after the handover only the engine touches a connection's socket and
  ``SSLObject``. The one reader elsewhere, the TLS session cache harvesting TLS 1.3
  tickets from live client connections, sees a snapshot the engine publishes
  (:class:`_EngineOwnedSSLObject`), never the live OpenSSL session.
* GIL: the engine thread holds the GIL while it copies; per wakeup it does one ``poll``, a
  dict lookup, one recv, one SSL call and one send. ``open_pump_engine`` lowers the switch
  interval (``sys.setswitchinterval``) so a busy trio thread delays the engine by at most
  ~0.5 ms instead of 5 ms.
"""

from __future__ import annotations

import collections
import contextlib
import heapq
import itertools
import os
import select
import socket
import ssl
import struct
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, cast

import trio

from agent.pump import Connection, Outcome, PlainConnection, PumpResult
from agent.tlsconn import TLSConnection, read_received_records

_BUDGET = 16  # chunks per direction per wakeup
_MAX_EVENTS = 256  # per poll; the default (FD_SETSIZE - 1) mallocs 12 KiB per call
_IDLE_TICKS = 4
_RAW_BUFFER = 65536
_ABORT_WAIT = 5.0  # seconds pump() waits, shielded, for the engine to confirm an abort
_LINGER_RESET = struct.pack("ii", 1, 0)
_SWITCH_INTERVAL = 0.0005

_IN = select.EPOLLIN
_OUT = select.EPOLLOUT
_TROUBLE = select.EPOLLERR | select.EPOLLHUP

# Direction states.
_READING, _EOF_SEEN, _DONE = 0, 1, 2


class _NoBIO:
    """Stands in for a plain socket's (absent) outgoing BIO: nothing is ever pending."""

    __slots__ = ()
    pending = 0


_NO_BIO = _NoBIO()


class _Side:
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

    def __init__(self, sock: socket.socket, job: _Job) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.job = job
        self.obj: ssl.SSLObject | None = None
        # The C object behind ``obj`` (``ssl.SSLObject._sslobj``): the fast paths call its
        # read/write/pending directly, one Python frame less each (CPython 3.11 stdlib).
        self.ssl: Any = None
        self.incoming: ssl.MemoryBIO | None = None
        self.outgoing: ssl.MemoryBIO | _NoBIO = _NO_BIO
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
        self.src_of: _Direction  # set by _Job
        self.dst_of: _Direction

    def has_output(self) -> bool:
        return self.pending is not None or self.outgoing.pending > 0

    def has_buffered_input(self) -> bool:
        if self.stash or self.stash_end is not None:
            return True
        obj, incoming = self.obj, self.incoming
        if obj is None or incoming is None:
            return False
        return incoming.pending > 0 or obj.pending() > 0


class _Direction:
    """Bytes from ``src`` to ``dst`` through one fixed buffer."""

    __slots__ = ("count", "dst", "fast", "src", "state", "view")

    def __init__(self, src: _Side, dst: _Side, buffer_size: int) -> None:
        self.src = src
        self.dst = dst
        self.view = memoryview(bytearray(buffer_size))
        self.count = 0
        self.state = _READING
        # The one-chunk fast path for this pair of socket kinds (see _fast_plain_plain).
        self.fast: Callable[[_Direction], bool] | None = None


class _Job:
    """One pumped connection: both sides, both directions, and how to report back."""

    __slots__ = (
        "a", "a_to_b", "b", "b_to_a", "deliver", "finished", "idle_timeout", "quiet", "seen",
    )  # fmt: skip

    def __init__(self, a: Connection, b: Connection, idle_timeout: float, buffer_size: int,
                 deliver: _Delivery) -> None:  # fmt: skip
        self.a = _side_from(a, self)
        self.b = _side_from(b, self)
        self.a_to_b = _Direction(self.a, self.b, buffer_size)
        self.b_to_a = _Direction(self.b, self.a, buffer_size)
        self.a.src_of = self.b.dst_of = self.a_to_b
        self.b.src_of = self.a.dst_of = self.b_to_a
        for d in (self.a_to_b, self.b_to_a):
            d.fast = _FAST_PATHS[d.src.obj is not None, d.dst.obj is not None]
        self.idle_timeout = idle_timeout
        self.deliver = deliver
        self.finished = False
        self.seen = 0
        self.quiet = 0


@dataclass
class _Delivery:
    """The trio side of one job: where the engine's verdict lands."""

    token: trio.lowlevel.TrioToken
    done: trio.Event
    outcome: Outcome = "error"
    detail: str = "not finished"
    a_to_b: int = 0
    b_to_a: int = 0

    def set(self, outcome: Outcome, detail: str, a_to_b: int, b_to_a: int) -> None:
        """Runs in the trio thread (via ``run_sync_soon``)."""
        self.outcome, self.detail, self.a_to_b, self.b_to_a = outcome, detail, a_to_b, b_to_a
        self.done.set()


def _side_from(conn: Connection, job: _Job) -> _Side:
    """Take over what ``conn`` holds: its socket, and for TLS the session and buffered bytes."""
    if isinstance(conn, PlainConnection):
        return _Side(conn.hand_over(), job)
    if isinstance(conn, TLSConnection):
        state = conn.hand_over()
        side = _Side(state.sock, job)
        side.obj, side.incoming, side.outgoing = state.obj, state.incoming, state.outgoing
        side.ssl = getattr(state.obj, "_sslobj", state.obj)
        side.stash, side.stash_end, side.eof_sent = state.stash, state.stash_end, state.eof_sent
        side.rbuf = memoryview(bytearray(_RAW_BUFFER))
        if not state.obj.server_side:
            state.obj.__class__ = _EngineOwnedSSLObject
            if conn.harvest_ticket:
                # Still on the trio thread, which owns the object until the job is queued.
                # Reading a session copies it (~0.5 ms), so only for the connection the
                # session cache will harvest a ticket from.
                state.obj.__dict__[_SESSION_KEY] = side.ssl.session
                side.watch_ticket = True
        return side
    raise TypeError(f"the epoll engine cannot pump a {type(conn).__name__}")


_SESSION_KEY = "_meshd_published_session"


class _EngineOwnedSSLObject(ssl.SSLObject):
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
        published: ssl.SSLSession | None = self.__dict__.get(_SESSION_KEY)
        return published

    @session.setter
    def session(self, value: ssl.SSLSession | None) -> None:
        raise ValueError("cannot set the session of an established, engine-owned connection")


class PumpEngine:
    """A thread running an epoll loop that pumps established connections.

    Create and stop it with :func:`open_pump_engine`; from trio, call :meth:`pump`.
    """

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._epoll.register(self._wake_fd, _IN)
        self._inbox: collections.deque[tuple[str, _Job]] = collections.deque()
        self._sides: dict[int, _Side] = {}
        self._jobs: set[_Job] = set()
        self._timers: list[tuple[float, int, _Job]] = []
        self._seq = itertools.count()
        self._ready: list[_Direction] = []
        self._stopping = False
        self._exited = False  # set by the engine thread just before its last inbox pass
        self._crashed: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="meshd-pump-engine", daemon=True)

    # ------------------------------------------------------------ trio side

    def start(self) -> None:
        """Start the engine thread."""
        self._thread.start()

    def thread_alive(self) -> bool:
        """True until the engine thread has ended."""
        return self._thread.is_alive()

    @property
    def running(self) -> bool:
        """True while the engine thread runs and accepts connections."""
        return self._thread.is_alive() and not self._stopping

    def __len__(self) -> int:
        """Connections currently pumped (approximate when read from another thread)."""
        return len(self._jobs)

    async def pump(
        self, a: Connection, b: Connection, *, idle_timeout: float, buffer_size: int = 65536
    ) -> PumpResult:
        """Copy both ways between ``a`` and ``b`` on the engine thread; see :func:`agent.pump.pump`.

        ``a`` and ``b`` are :class:`~agent.pump.PlainConnection` or
        :class:`~agent.tlsconn.TLSConnection` (after the handshake and any identity checks);
        the engine owns and closes them. Cancellation resets both sockets, then propagates.

        Raises:
            RuntimeError: the engine is not running (both connections are reset first).
        """
        start = trio.current_time()
        if not self.running:
            a.abort()
            b.abort()
            raise RuntimeError("the pump engine is not running")
        delivery = _Delivery(trio.lowlevel.current_trio_token(), trio.Event())
        job = _Job(a, b, idle_timeout, buffer_size, delivery)
        item = ("pump", job)
        self._submit(*item)
        if self._exited:
            # The engine may have made its last inbox pass before our append: whoever
            # removes the item (deque operations are atomic) owns the job.
            try:
                self._inbox.remove(item)
            except ValueError:
                pass  # the engine took it and will report
            else:
                _reset(job.a.sock)
                _reset(job.b.sock)
                raise RuntimeError("the pump engine is not running")
        try:
            await delivery.done.wait()
        except BaseException:
            # Cancelled (or KeyboardInterrupt): the engine thread owns the sockets, so it
            # must be the one to reset them. Wait (bounded) so they are gone on return.
            self._submit("abort", job)
            with trio.CancelScope(shield=True), trio.move_on_after(_ABORT_WAIT):
                await delivery.done.wait()
            raise
        return PumpResult(
            bytes_a_to_b=delivery.a_to_b,
            bytes_b_to_a=delivery.b_to_a,
            outcome=delivery.outcome,
            duration=trio.current_time() - start,
            detail=delivery.detail,
        )

    def request_stop(self) -> None:
        """Ask the engine to reset every connection it holds and exit (non-blocking)."""
        self._stopping = True
        self._wake()

    def close(self) -> None:
        """Release the epoll and eventfd; only once the thread has ended."""
        if self._thread.is_alive():
            return  # still running (stuck?): leave the fds to it rather than race it
        self._epoll.close()
        with contextlib.suppress(OSError):
            os.close(self._wake_fd)
        self._wake_fd = -1

    def _submit(self, what: str, job: _Job) -> None:
        self._inbox.append((what, job))
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # EAGAIN only if 2**64-2 wakeups are unread
            os.eventfd_write(self._wake_fd, 1)

    # ------------------------------------------------------------ engine thread

    def _run(self) -> None:
        poll, wake_fd = self._epoll.poll, self._wake_fd
        try:
            while not self._stopping:
                if self._dispatch(poll(self._poll_timeout(), _MAX_EVENTS), wake_fd):
                    with contextlib.suppress(BlockingIOError):
                        os.eventfd_read(wake_fd)
                    self._take_inbox()
                if self._timers and self._timers[0][0] <= time.monotonic():
                    self._check_idle()
        except BaseException as exc:  # the loop itself failed: release everyone below
            self._crashed = exc
            raise
        finally:
            self._stopping = True
            reason = (
                "pump engine stopped"
                if self._crashed is None
                else f"pump engine failed: {_describe(self._crashed)}"
            )
            for job in list(self._jobs):
                self._finish(job, "error", reason)
            self._exited = True
            self._take_inbox()  # each is finished at once (we are stopping)

    def _dispatch(self, events: list[tuple[int, int]], wake_fd: int) -> bool:
        """Handle one poll's events, then directions left with buffered bytes; True when
        the wakeup fd fired (the inbox is taken after the batch, so that a new connection
        can never receive a stale event meant for a closed fd of the same number)."""
        sides, woken = self._sides, False
        for fd, ev in events:
            side = sides.get(fd)
            if side is None or side.job.finished:
                woken = woken or fd == wake_fd
            elif ev == _IN:  # the common case: bytes to pass on
                d = side.src_of
                fast = d.fast
                if fast is None or d.state != _READING:
                    side.drained = False
                    self._step(d)
                    continue
                try:
                    done = fast(d)
                except Exception as exc:
                    self._fail(side.job, exc)
                    continue
                if not done:
                    self._step(d)
            else:
                self._on_event(side, ev)
        if self._ready:
            again, self._ready = self._ready, []
            for d in again:
                if not d.src.job.finished:
                    self._step(d)
        return woken

    def _poll_timeout(self) -> float:
        if self._ready:
            return 0
        if not self._timers:
            return -1
        return max(0.0, self._timers[0][0] - time.monotonic())

    def _take_inbox(self) -> None:
        inbox = self._inbox
        while inbox:
            what, job = inbox.popleft()
            if what == "pump":
                self._add(job)
            elif not job.finished:
                self._finish(job, "error", "cancelled")

    def _add(self, job: _Job) -> None:
        self._jobs.add(job)
        if self._stopping:
            self._finish(job, "error", "pump engine stopped")
            return
        for side in (job.a, job.b):
            self._sides[side.fd] = side
        if job.idle_timeout > 0:
            self._schedule(job)
        # Bytes may already be buffered (TLS records, a stash) or the sockets readable:
        # run both directions once; they stop at the first would-block.
        self._step(job.a_to_b)
        if not job.finished:
            self._step(job.b_to_a)

    def _schedule(self, job: _Job) -> None:
        when = time.monotonic() + job.idle_timeout / _IDLE_TICKS
        heapq.heappush(self._timers, (when, next(self._seq), job))

    def _check_idle(self) -> None:
        now, timers = time.monotonic(), self._timers
        while timers and timers[0][0] <= now:
            _, _, job = heapq.heappop(timers)
            if job.finished:
                continue
            total = job.a_to_b.count + job.b_to_a.count
            job.quiet = job.quiet + 1 if total == job.seen else 0
            job.seen = total
            if job.quiet >= _IDLE_TICKS:
                self._finish(job, "idle_timeout", f"no bytes moved for {job.idle_timeout}s")
            else:
                self._schedule(job)

    def _on_event(self, side: _Side, ev: int) -> None:
        job = side.job
        if ev & (_OUT | _TROUBLE) and side.has_output():
            # The direction writing into this socket was backed up: flush, then resume it.
            self._step(side.dst_of)
        if ev & (_IN | _TROUBLE) and not job.finished and side.src_of.state == _READING:
            side.drained = False
            self._step(side.src_of)

    def _step(self, d: _Direction) -> None:
        """Run direction ``d``; a failure ends its connection, never the engine."""
        job = d.src.job
        try:
            self._run_direction(d)
            if not job.finished:
                self._settle(job)
        except Exception as exc:
            self._fail(job, exc)

    def _fail(self, job: _Job, exc: Exception) -> None:
        if isinstance(exc, ConnectionError | ssl.SSLEOFError):
            self._finish(job, "reset", _describe(exc))
        elif isinstance(exc, OSError | ssl.SSLError):
            self._finish(job, "error", _describe(exc))
        else:
            self._finish(job, "error", f"pump engine: {_describe(exc)}")

    def _run_direction(self, d: _Direction) -> None:
        """Move as many bytes from ``d.src`` to ``d.dst`` as can go without blocking."""
        src, dst = d.src, d.dst
        if (dst.pending is not None or dst.outgoing.pending) and not _flush(dst):
            return  # still backed up: EPOLLOUT on dst brings us back
        if d.state == _READING:
            view = d.view
            for _ in range(_BUDGET):
                n = _read(src, view)
                if n is None:
                    return  # nothing more now: EPOLLIN on src brings us back
                if n == 0:
                    d.state = _EOF_SEEN
                    break
                d.count += n
                if not _write(dst, view[:n]):
                    return  # backed up
                if src.drained and src.obj is None:
                    return  # short plaintext read: the next would be EAGAIN
            else:
                if src.has_buffered_input():
                    self._ready.append(d)  # epoll would not report bytes already in a BIO
                return
        if d.state == _EOF_SEEN:
            d.state = _DONE
            _send_eof(dst)

    def _settle(self, job: _Job) -> None:
        """Finish a connection whose work is done, or update what epoll watches for it."""
        a, b, ab, ba = job.a, job.b, job.a_to_b, job.b_to_a
        a_out = a.pending is not None or a.outgoing.pending > 0
        b_out = b.pending is not None or b.outgoing.pending > 0
        if ab.state == _DONE and ba.state == _DONE and not (a_out or b_out):
            self._finish(job, "closed", "")
            return
        # A socket is read while the direction it feeds reads and that one's destination
        # (the other socket) has nothing unsent; it is written to while it has output.
        want = (_OUT if a_out else 0) | (_IN if ab.state == _READING and not b_out else 0)
        if want != a.mask:
            self._watch(a, want)
        want = (_OUT if b_out else 0) | (_IN if ba.state == _READING and not a_out else 0)
        if want != b.mask:
            self._watch(b, want)

    def _watch(self, side: _Side, want: int) -> None:
        if not want:
            self._epoll.unregister(side.fd)
        elif side.mask:
            self._epoll.modify(side.fd, want)
        else:
            self._epoll.register(side.fd, want)
        side.mask = want

    def _finish(self, job: _Job, outcome: Outcome, detail: str) -> None:
        """Close both sockets (FIN when clean, RST otherwise) and report to trio."""
        if job.finished:
            return
        job.finished = True
        self._jobs.discard(job)
        for side in (job.a, job.b):
            if side.mask:
                with contextlib.suppress(OSError):
                    self._epoll.unregister(side.fd)
                side.mask = 0
            if self._sides.get(side.fd) is side:
                del self._sides[side.fd]
            if outcome == "closed":
                side.sock.close()
            else:
                _reset(side.sock)
        delivery = job.deliver
        result = (outcome, detail, job.a_to_b.count, job.b_to_a.count)
        with contextlib.suppress(trio.RunFinishedError):  # nobody is waiting any more
            delivery.token.run_sync_soon(delivery.set, *result)


# ---------------------------------------------------------------- per-socket primitives
# Engine thread only. They raise OSError / ssl.SSLError; the caller ends the connection.


def _read(src: _Side, view: memoryview) -> int | None:
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


def _read_tls(src: _Side, obj: ssl.SSLObject, view: memoryview) -> int | None:
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


def _decrypt(src: _Side, obj: ssl.SSLObject, view: memoryview) -> int | None:
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
        _flush(src)  # post-handshake replies (e.g. a TLS 1.3 KeyUpdate)
    return n


def _publish_ticket(side: _Side) -> None:
    """Engine thread, after a read: publish the client session once it holds a ticket."""
    session = side.ssl.session
    if session is not None and session.has_ticket:
        cast(ssl.SSLObject, side.obj).__dict__[_SESSION_KEY] = session
        side.watch_ticket = False


# ---------------------------------------------------------------- fast paths
# One chunk for the common case (an EPOLLIN on a direction that reads, nothing pending):
# read once, pass it on, and return True when that is all there is to do (the socket was
# drained, everything was sent, epoll's interest stays as it is). Anything else (EOF, a
# full buffer, a partial send, a partial TLS record left over) leaves consistent state and
# returns False, and the general path (_run_direction, then _settle) takes over from there.


def _recv_short(src: _Side, buf: memoryview) -> int:
    """``recv_into``; -1 when nothing was there. Sets ``drained`` after a short read."""
    try:
        n = src.sock.recv_into(buf)
    except BlockingIOError:
        src.drained = True
        return -1
    src.drained = 0 < n < len(buf)
    return n


def _send_some(dst: _Side, data: memoryview | bytes) -> bool:
    """Send; keep what did not go as ``dst.pending``; True when all went."""
    try:
        sent = dst.sock.send(data)
    except BlockingIOError:
        sent = 0
    if sent == len(data):
        return True
    dst.pending = memoryview(data)[sent:]
    return False


def _fast_plain_plain(d: _Direction) -> bool:
    src, dst, view = d.src, d.dst, d.view
    if dst.pending is not None:
        return False
    n = _recv_short(src, view)
    if n <= 0:
        return n < 0  # EAGAIN: nothing to do; EOF: the general path reads it again
    d.count += n
    return _send_some(dst, view[:n]) and src.drained


def _fast_plain_tls(d: _Direction) -> bool:
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


def _fast_tls_plain(d: _Direction) -> bool:
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
            d.state = _EOF_SEEN
            return False
        if src.watch_ticket:  # before the bytes go on: whoever sees them sees the ticket
            _publish_ticket(src)
        d.count += n
        if not _send_some(dst, view[:n]):
            return False
    if src.outgoing.pending:
        _flush(src)  # post-handshake replies (e.g. a TLS 1.3 KeyUpdate)
        return False
    return src.drained


_FAST_PATHS: dict[tuple[bool, bool], Callable[[_Direction], bool] | None] = {
    (False, False): _fast_plain_plain,
    (False, True): _fast_plain_tls,
    (True, False): _fast_tls_plain,
    (True, True): None,
}


def _take_stash(src: _Side, view: memoryview) -> int:
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


def _write(dst: _Side, data: memoryview) -> bool:
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
    return _flush(dst)


def _flush(side: _Side) -> bool:
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


def _send_eof(dst: _Side) -> None:
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
    _flush(dst)


def _stash_undelivered(side: _Side) -> None:
    """Decrypt every record already received so ``SSL_shutdown`` cannot read one."""
    if side.stash_end is None:
        obj, incoming = cast(ssl.SSLObject, side.obj), cast(ssl.MemoryBIO, side.incoming)
        side.stash_end = read_received_records(obj, incoming, side.stash)


def _reset(sock: socket.socket) -> None:
    """Close with a TCP RST (SO_LINGER 0)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    sock.close()


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


# ---------------------------------------------------------------- lifecycle


@contextlib.asynccontextmanager
async def open_pump_engine(
    *, stop_timeout: float = 5.0, switch_interval: float | None = _SWITCH_INTERVAL
) -> AsyncIterator[PumpEngine]:
    """Run a :class:`PumpEngine` for the duration of the block.

    On exit the engine resets whatever it still holds (their ``pump()`` calls return
    ``error``/"pump engine stopped"), and its thread is joined for at most ``stop_timeout``
    seconds without blocking trio.

    Args:
        stop_timeout: how long to wait for the thread to end.
        switch_interval: the GIL switch interval while the engine runs (None: unchanged);
            the previous value is restored on exit.
    """
    engine = PumpEngine()
    previous = sys.getswitchinterval()
    if switch_interval is not None:
        sys.setswitchinterval(min(previous, switch_interval))
    engine.start()
    try:
        yield engine
    finally:
        engine.request_stop()
        with trio.CancelScope(shield=True), trio.move_on_after(stop_timeout):
            while engine.thread_alive():
                await trio.sleep(0.005)
        engine.close()
        if switch_interval is not None:
            sys.setswitchinterval(previous)
