"""Warm connections: mTLS connections opened and verified before an application needs one.

Design note (docs/adr/010-warm-connections.md). A fresh mutual-TLS connection costs
milliseconds of handshake and certificate work on both hosts, and an application that opens
a connection per request pays it on every request. The outbound proxy therefore keeps, per
(local identity's client context, destination service, endpoint) it has recently used, a
few connections that are already handshaken and verified, and hands one to the next
application connection for that endpoint; a replacement is opened in the background,
``REFILL_DELAY_S`` (2 ms) later: long enough for the connection that used one to get its
first bytes through both engines before the refill's handshake takes the GIL and a core
(immediately after the take, it delayed that request by ~0.5 ms at p50), short enough that
a pool of two keeps up with hundreds of new connections per second to one endpoint.

Rules that keep this safe and bounded:

* A warm connection is only ever used with the very client context it was made with
  (``is``): a renewal or a new trust bundle builds a new context and the old connections
  are dropped. The caller re-verifies the peer against the current bundle and clock at
  hand-out (cheap: :class:`meshd.peer.PeerVerifier` remembers the chain).
* Only peers that agreed on ALPN ``meshd/1`` are kept warm: their inbound proxy waits for
  the ``GO`` preamble before it authorizes and dials the application
  (:mod:`agent.carrier`), so an unused warm connection never reaches an application.
* At hand-out a connection is checked without waiting (:meth:`TLSConnection.still_idle`):
  one the peer closed is dropped and the next is tried.
* Bounded: ``per_endpoint`` per key, ``max_total`` overall, closed after ``idle_timeout``
  seconds unused; a key not used for ``idle_timeout`` is forgotten. A failed background dial
  stops refills of that key for a second; a peer without ``meshd/1`` for a minute.
"""

from __future__ import annotations

import ssl
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from agent.carrier import speaks_carrier
from agent.tlsconn import TLSConnection

Dial = Callable[[], Awaitable[TLSConnection | None]]
EndpointKey = tuple[str, int]
REFILL_DELAY_S = 0.002  # see the module note
SWEEP_INTERVAL_S = 1.0
RETRY_AFTER_FAILURE_S = 1.0
RETRY_AFTER_OLD_PEER_S = 60.0


@dataclass
class _Slot:
    ctx: ssl.SSLContext
    idle: deque[tuple[TLSConnection, float]] = field(default_factory=deque)
    refilling: int = 0
    last_use: float = 0.0
    retry_after: float = 0.0


class WarmPool:
    """Ready, verified outbound mTLS connections per (context, service, endpoint).

    ``per_endpoint = 0`` disables it: :meth:`take` always misses and nothing is opened.
    Refills need :meth:`serve` running (it owns their tasks); without it the pool only
    misses.
    """

    def __init__(
        self,
        *,
        per_endpoint: int = 2,
        idle_timeout: float = 30.0,
        max_total: int = 256,
        count: Callable[[str], None] = lambda _outcome: None,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.per_endpoint = per_endpoint
        self.idle_timeout = idle_timeout
        self.max_total = max_total
        self._count = count
        self._clock = clock
        self._slots: dict[tuple[str, EndpointKey], _Slot] = {}
        self._idle_total = 0
        self._refilling_total = 0
        self._nursery: trio.Nursery | None = None
        self._stopped = False

    @property
    def idle_count(self) -> int:
        """Warm connections waiting to be used."""
        return self._idle_total

    def take(
        self, ctx: ssl.SSLContext, service: str, endpoint: EndpointKey
    ) -> TLSConnection | None:
        """A warm connection to *endpoint* of *service* made with *ctx*, or None.

        The caller must still verify the peer and send the ``GO`` preamble.
        """
        slot = self._slots.get((service, endpoint))
        if slot is None or slot.ctx is not ctx:
            if self.per_endpoint:
                self._count("miss")
            return None
        now = self._clock()
        while slot.idle:
            tls, opened = slot.idle.popleft()
            self._idle_total -= 1
            if now - opened > self.idle_timeout:
                self._count("expired")
                tls.close()
            elif not tls.still_idle():
                self._count("closed_by_peer")
                tls.close()
            else:
                self._count("hit")
                return tls
        self._count("miss")
        return None

    def replenish(
        self, ctx: ssl.SSLContext, service: str, endpoint: EndpointKey, dial: Dial
    ) -> None:
        """Note a use of (*ctx*, *service*, *endpoint*) and open warm connections to it.

        *dial* opens and verifies one connection (None on failure); it runs in the
        background, up to ``per_endpoint`` idle plus opening per key.
        """
        if self._nursery is None or self._stopped or self.per_endpoint <= 0:
            return
        key = (service, endpoint)
        slot = self._slots.get(key)
        if slot is None or slot.ctx is not ctx:
            if slot is not None:
                self._drop(slot)
            slot = self._slots[key] = _Slot(ctx)
        now = self._clock()
        slot.last_use = now
        if now < slot.retry_after:
            return
        while (
            len(slot.idle) + slot.refilling < self.per_endpoint
            and self._idle_total + self._refilling_total < self.max_total
        ):
            slot.refilling += 1
            self._refilling_total += 1
            self._nursery.start_soon(self._refill, key, slot, dial)

    async def serve(
        self, *, task_status: trio.TaskStatus[WarmPool] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Own the refills and close expired connections; on exit, close every one."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started(self)
                while True:
                    await trio.sleep(SWEEP_INTERVAL_S)
                    self._sweep()
        finally:
            self._nursery = None
            self.close_all()

    def close_all(self) -> None:
        """Close every warm connection, forget every key and open no more (shutdown)."""
        self._stopped = True
        for slot in self._slots.values():
            self._drop(slot)
        self._slots.clear()

    async def _refill(self, key: tuple[str, EndpointKey], slot: _Slot, dial: Dial) -> None:
        try:
            await trio.sleep(REFILL_DELAY_S)
            tls = await dial()
        except Exception:  # a bug in one dial must not stop the agent: counted as failed
            tls = None
        finally:
            slot.refilling -= 1
            self._refilling_total -= 1
        now = self._clock()
        if tls is None:
            self._count("open_failed")
            slot.retry_after = now + RETRY_AFTER_FAILURE_S
            return
        if not speaks_carrier(tls):
            self._count("peer_without_meshd_1")
            slot.retry_after = now + RETRY_AFTER_OLD_PEER_S
            tls.close()
            return
        if self._slots.get(key) is not slot or self._stopped:
            tls.close()  # the key was dropped while this one was opening
            return
        slot.idle.append((tls, now))
        self._idle_total += 1

    def _sweep(self) -> None:
        now = self._clock()
        for key, slot in list(self._slots.items()):
            while slot.idle and now - slot.idle[0][1] > self.idle_timeout:
                tls, _ = slot.idle.popleft()
                self._idle_total -= 1
                self._count("expired")
                tls.close()
            if not slot.idle and not slot.refilling and now - slot.last_use > self.idle_timeout:
                del self._slots[key]

    def _drop(self, slot: _Slot) -> None:
        while slot.idle:
            tls, _ = slot.idle.popleft()
            self._idle_total -= 1
            tls.close()
