"""The epoll pump engine: the L4 byte pump's per-chunk work on a dedicated ``select.epoll`` thread.

Design note (measurements and the decision in docs/adr/003-fast-tls-pump.md). This module
is the loop and the hand-over; a connection's state and its per-socket steps (read, write,
half-close, the fast paths) are in :mod:`agent.epollio`.

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
  (:class:`agent.epollio.EngineOwnedSSLObject`), never the live OpenSSL session.
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
import ssl
import sys
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import trio

from agent import buffers
from agent.epollio import (
    DONE,
    EOF_SEEN,
    FAST_PATHS,
    READING,
    SESSION_KEY,
    Direction,
    EngineOwnedSSLObject,
    Side,
    describe,
    flush,
    read,
    reset,
    send_eof,
    write,
)
from agent.pump import Connection, Outcome, PlainConnection, PumpFunction, PumpResult, pump
from agent.tlsconn import TLSConnection

_BUDGET = 16  # chunks per direction per wakeup
_MAX_EVENTS = 256  # per poll; the default (FD_SETSIZE - 1) mallocs 12 KiB per call
_IDLE_TICKS = 4
_TIMER_SLACK = 256  # stale idle-check entries tolerated before the heap is swept
_ABORT_WAIT = 5.0  # seconds pump() waits, shielded, for the engine to confirm an abort
_SWITCH_INTERVAL = 0.0005

_IN = select.EPOLLIN
_OUT = select.EPOLLOUT
_TROUBLE = select.EPOLLERR | select.EPOLLHUP


class Job:
    """One pumped connection: both sides, both directions, and how to report back."""

    __slots__ = (
        "a", "a_to_b", "b", "b_to_a", "deliver", "finished", "idle_timeout", "quiet", "seen",
        "timer",
    )  # fmt: skip

    def __init__(self, a: Connection, b: Connection, idle_timeout: float, buffer_size: int,
                 deliver: Delivery) -> None:  # fmt: skip
        self.a = _side_from(a, self)
        self.b = _side_from(b, self)
        self.a_to_b = Direction(self.a, self.b, buffer_size)
        self.b_to_a = Direction(self.b, self.a, buffer_size)
        self.a.src_of = self.b.dst_of = self.a_to_b
        self.b.src_of = self.a.dst_of = self.b_to_a
        for d in (self.a_to_b, self.b_to_a):
            d.fast = FAST_PATHS[d.src.obj is not None, d.dst.obj is not None]
        self.idle_timeout = idle_timeout
        self.deliver = deliver
        self.finished = False
        self.seen = 0
        self.quiet = 0
        self.timer = -1  # its entry in PumpEngine._timed while an idle check is due


@dataclass
class Delivery:
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


def _side_from(conn: Connection, job: Job) -> Side:
    """Take over what ``conn`` holds: its socket, and for TLS the session and buffered bytes."""
    if isinstance(conn, PlainConnection):
        return Side(conn.hand_over(), job)
    if isinstance(conn, TLSConnection):
        state = conn.hand_over()
        side = Side(state.sock, job)
        side.obj, side.incoming, side.outgoing = state.obj, state.incoming, state.outgoing
        side.ssl = getattr(state.obj, "_sslobj", state.obj)
        side.stash, side.stash_end, side.eof_sent = state.stash, state.stash_end, state.eof_sent
        side.rbuf = state.rbuf
        if not state.obj.server_side:
            state.obj.__class__ = EngineOwnedSSLObject
            if conn.harvest_ticket:
                # Still on the trio thread, which owns the object until the job is queued.
                # Reading a session copies it (~0.5 ms), so only for the connection the
                # session cache will harvest a ticket from.
                state.obj.__dict__[SESSION_KEY] = side.ssl.session
                side.watch_ticket = True
        return side
    raise TypeError(f"the epoll engine cannot pump a {type(conn).__name__}")


class PumpEngine:
    """A thread running an epoll loop that pumps established connections.

    Create and stop it with :func:`open_pump_engine`; from trio, call :meth:`pump`.
    """

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._epoll.register(self._wake_fd, _IN)
        self._inbox: collections.deque[tuple[str, Job]] = collections.deque()
        self._sides: dict[int, Side] = {}
        self._jobs: set[Job] = set()
        # Idle checks: a heap of (when, seq) and the job each live seq is for. A finished
        # job leaves _timed at once (its heap entry, a few dozen bytes, is skipped when it
        # comes up, and swept when stale entries outnumber live ones): a heap holding jobs
        # kept every finished connection's buffers and TLS state for idle_timeout / 4.
        self._timers: list[tuple[float, int]] = []
        self._timed: dict[int, Job] = {}
        self._seq = itertools.count()
        self._ready: list[Direction] = []
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

    def idle_checks(self) -> tuple[int, int]:
        """Connections with an idle check due, and entries in the check heap (at most
        twice the first plus a small slack: finished connections are not kept)."""
        return len(self._timed), len(self._timers)

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
        delivery = Delivery(trio.lowlevel.current_trio_token(), trio.Event())
        job = Job(a, b, idle_timeout, buffer_size, delivery)
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
                reset(job.a.sock)
                reset(job.b.sock)
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

    def _submit(self, what: str, job: Job) -> None:
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
                else f"pump engine failed: {describe(self._crashed)}"
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
                if fast is None or d.state != READING:
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

    def _add(self, job: Job) -> None:
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

    def _schedule(self, job: Job) -> None:
        when = time.monotonic() + job.idle_timeout / _IDLE_TICKS
        job.timer = seq = next(self._seq)
        self._timed[seq] = job
        heapq.heappush(self._timers, (when, seq))

    def _unschedule(self, job: Job) -> None:
        if self._timed.pop(job.timer, None) is None:
            return
        if len(self._timers) > 2 * len(self._timed) + _TIMER_SLACK:
            timed = self._timed
            self._timers = [entry for entry in self._timers if entry[1] in timed]
            heapq.heapify(self._timers)

    def _check_idle(self) -> None:
        now, timers = time.monotonic(), self._timers
        while timers and timers[0][0] <= now:
            _, seq = heapq.heappop(timers)
            job = self._timed.pop(seq, None)
            if job is None or job.finished:
                continue
            total = job.a_to_b.count + job.b_to_a.count
            job.quiet = job.quiet + 1 if total == job.seen else 0
            job.seen = total
            if job.quiet >= _IDLE_TICKS:
                self._finish(job, "idle_timeout", f"no bytes moved for {job.idle_timeout}s")
            else:
                self._schedule(job)

    def _on_event(self, side: Side, ev: int) -> None:
        job = side.job
        if ev & (_OUT | _TROUBLE) and side.has_output():
            # The direction writing into this socket was backed up: flush, then resume it.
            self._step(side.dst_of)
        if ev & (_IN | _TROUBLE) and not job.finished and side.src_of.state == READING:
            side.drained = False
            self._step(side.src_of)

    def _step(self, d: Direction) -> None:
        """Run direction ``d``; a failure ends its connection, never the engine."""
        job = d.src.job
        try:
            self._run_direction(d)
            if not job.finished:
                self._settle(job)
        except Exception as exc:
            self._fail(job, exc)

    def _fail(self, job: Job, exc: Exception) -> None:
        if isinstance(exc, ConnectionError | ssl.SSLEOFError):
            self._finish(job, "reset", describe(exc))
        elif isinstance(exc, OSError | ssl.SSLError):
            self._finish(job, "error", describe(exc))
        else:
            self._finish(job, "error", f"pump engine: {describe(exc)}")

    def _run_direction(self, d: Direction) -> None:
        """Move as many bytes from ``d.src`` to ``d.dst`` as can go without blocking."""
        src, dst = d.src, d.dst
        if (dst.pending is not None or dst.outgoing.pending) and not flush(dst):
            return  # still backed up: EPOLLOUT on dst brings us back
        if d.state == READING:
            view = d.view
            for _ in range(_BUDGET):
                n = read(src, view)
                if n is None:
                    return  # nothing more now: EPOLLIN on src brings us back
                if n == 0:
                    d.state = EOF_SEEN
                    break
                d.count += n
                if not write(dst, view[:n]):
                    return  # backed up
                if src.drained and src.obj is None:
                    return  # short plaintext read: the next would be EAGAIN
            else:
                if src.has_buffered_input():
                    self._ready.append(d)  # epoll would not report bytes already in a BIO
                return
        if d.state == EOF_SEEN:
            d.state = DONE
            send_eof(dst)

    def _settle(self, job: Job) -> None:
        """Finish a connection whose work is done, or update what epoll watches for it."""
        a, b, ab, ba = job.a, job.b, job.a_to_b, job.b_to_a
        a_out = a.pending is not None or a.outgoing.pending > 0
        b_out = b.pending is not None or b.outgoing.pending > 0
        if ab.state == DONE and ba.state == DONE and not (a_out or b_out):
            self._finish(job, "closed", "")
            return
        # A socket is read while the direction it feeds reads and that one's destination
        # (the other socket) has nothing unsent; it is written to while it has output.
        want = (_OUT if a_out else 0) | (_IN if ab.state == READING and not b_out else 0)
        if want != a.mask:
            self._watch(a, want)
        want = (_OUT if b_out else 0) | (_IN if ba.state == READING and not a_out else 0)
        if want != b.mask:
            self._watch(b, want)

    def _watch(self, side: Side, want: int) -> None:
        if not want:
            self._epoll.unregister(side.fd)
        elif side.mask:
            self._epoll.modify(side.fd, want)
        else:
            self._epoll.register(side.fd, want)
        side.mask = want

    def _finish(self, job: Job, outcome: Outcome, detail: str) -> None:
        """Close both sockets (FIN when clean, RST otherwise) and report to trio."""
        if job.finished:
            return
        job.finished = True
        self._jobs.discard(job)
        self._unschedule(job)
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
                reset(side.sock)
            if side.rbuf is not None:
                buffers.give(side.rbuf.obj)
        # Nothing reads or writes this connection's buffers from here on.
        buffers.give(job.a_to_b.view.obj)
        buffers.give(job.b_to_a.view.obj)
        delivery = job.deliver
        result = (outcome, detail, job.a_to_b.count, job.b_to_a.count)
        with contextlib.suppress(trio.RunFinishedError):  # nobody is waiting any more
            delivery.token.run_sync_soon(delivery.set, *result)


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


@contextlib.asynccontextmanager
async def open_pump(engine: str) -> AsyncIterator[PumpFunction]:
    """The pump for ``[proxy] engine``: an epoll engine's for the block's duration, or
    :func:`agent.pump.pump` for ``"trio"``."""
    if engine == "epoll":
        async with open_pump_engine() as eng:
            yield eng.pump
    else:
        yield pump
