"""The outbound proxy's TLS 1.3 sessions, for resuming instead of a full handshake.

Design note (docs/adr/008-cheap-new-connections.md). One entry per (service, endpoint): the
client context the session was made with, the newest session holding a ticket, and the
``SSLObject`` of the latest verified connection to harvest a newer ticket from (tickets
arrive after the handshake, so a connection's session is only worth keeping once it has
read something). A session is offered only

* with the very context it came from (``is``): a renewed certificate or a new trust bundle
  builds a new client context, which misses here and drops the entry (Python would also
  refuse it: ``ValueError``), and the server's new context could not open the old ticket;
* before the server's ticket lifetime ends, and before the earliest ``notAfter`` of the
  peer's verified path (a resumed session still presents the leaf of its first handshake,
  which the proxy verifies again; offering it after expiry would only earn a refusal).

TLS 1.3 tickets can be used more than once here (OpenSSL enforces single use only with
0-RTT, which Python never enables), so one session serves every connection until half its
ticket lifetime has passed. That matters on Python 3.11 with OpenSSL 3.0: CPython copies a
session (``i2d``/``d2i``, which re-parses the peer's certificate) both when
``SSLObject.session`` is read and when a session is handed to ``wrap_bio``, ~0.6-0.7 ms each.

Resumption decides nothing about identity: the proxy runs the same peer verification on a
resumed connection as on a full one. Bounded: at most ``max_entries`` (LRU). Not
thread-safe (one per trio thread).
"""

from __future__ import annotations

import datetime as dt
import ssl
from collections import OrderedDict
from dataclasses import dataclass

Endpoint = tuple[str, int]
HARVEST_RETRY = 0.05  # seconds between reads of a connection's session that has no ticket yet


@dataclass
class _Entry:
    ctx: ssl.SSLContext
    # Wall-clock seconds when the verified path of the session's (source's) peer expires.
    session_until: float = 0.0
    session: ssl.SSLSession | None = None
    source_until: float = 0.0
    source: ssl.SSLObject | None = None  # the latest connection, until its ticket arrives
    # A read of ``source.session`` found no ticket: do not pay for another before this.
    harvest_after: float = 0.0


class SessionCache:
    """Client sessions per (service, endpoint), bounded and tied to their context."""

    def __init__(self, max_entries: int = 1024) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._max = max_entries
        self._entries: OrderedDict[tuple[str, Endpoint], _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def session_for(
        self, ctx: ssl.SSLContext, service: str, endpoint: Endpoint, now: dt.datetime
    ) -> ssl.SSLSession | None:
        """A session to offer when dialling *endpoint* of *service* with *ctx*, or None.

        An entry made with another context, or whose session has expired, is dropped.
        """
        key = (service, endpoint)
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.ctx is not ctx:
            del self._entries[key]
            return None
        t = now.timestamp()
        _harvest(entry, t)
        session = entry.session
        if session is None or not _usable(session, entry.session_until, t):
            if entry.source is None:  # nothing left that could produce a usable session
                del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return session

    def connected(
        self,
        ctx: ssl.SSLContext,
        service: str,
        endpoint: Endpoint,
        conn: ssl.SSLObject,
        peer_valid_until: dt.datetime,
        now: dt.datetime,
    ) -> bool:
        """Record a connection whose peer has been verified: its ticket is used later.

        Call only after the peer verification succeeded. A full handshake (``conn`` did not
        resume) replaces whatever the entry held: a session that was offered and declined
        is worth nothing now. After a resumption the entry keeps its session until half its
        ticket lifetime has passed (reading a new one costs a copy, see the module note).

        Returns:
            True if *conn* is kept to take a ticket from (its ``session`` will be read).
        """
        key = (service, endpoint)
        entry = self._entries.get(key)
        if entry is None or entry.ctx is not ctx:
            entry = _Entry(ctx)
            self._entries[key] = entry
        elif not conn.session_reused:
            entry.session, entry.source = None, None
            self._entries.move_to_end(key)
        else:
            t = now.timestamp()
            _harvest(entry, t)
            self._entries.move_to_end(key)
            session = entry.session
            if session is not None and t < session.time + session.timeout / 2:
                return False
        entry.source, entry.source_until = conn, peer_valid_until.timestamp()
        entry.harvest_after = 0.0
        if len(self._entries) > self._max:
            self._entries.popitem(last=False)
        return True

    def forget(self, service: str, endpoint: Endpoint) -> None:
        """Drop the entry, e.g. after a resumed connection failed its peer verification."""
        self._entries.pop((service, endpoint), None)


def _harvest(entry: _Entry, now: float) -> None:
    """Take the source connection's session once it holds a ticket.

    Each read copies the session, so after a read that found no ticket yet (nothing received
    on that connection so far) the next try waits ``HARVEST_RETRY`` seconds.
    """
    if entry.source is None or now < entry.harvest_after:
        return
    session = entry.source.session
    if session is not None and session.has_ticket:
        entry.session, entry.session_until = session, entry.source_until
        entry.source = None
    else:
        entry.harvest_after = now + HARVEST_RETRY


def _usable(session: ssl.SSLSession, valid_until: float, now: float) -> bool:
    return now < min(session.time + session.timeout, valid_until)
