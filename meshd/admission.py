"""Connection limits of one proxy: how many connections it holds, and how many of them one
source may keep before its identity is verified.

Design note (docs/adr/013-connection-limits.md). The inbound proxy listens on the network:
anyone who can reach the port can open connections, and each costs a task, a descriptor
and, once a handshake starts, buffers, until the first-byte and handshake deadlines expire.
Two limits bound that, per proxy and per process:

* ``max_connections``: every connection the proxy holds, from accept to close (waiting for
  a first byte, in its handshake, waiting for first use, or flowing). It bounds memory.
* ``max_unverified_per_source``: connections from one source address that have not yet
  shown a verified mesh identity (or been admitted as plaintext). Verification ends this
  count, so it never limits established connections; it keeps one unauthenticated source
  from taking all of ``max_connections`` from everyone else.

A connection over either limit is refused at once (the caller resets it): a client learns
at once instead of waiting in the kernel's backlog behind connections that will never be
served. Refusals are counted here and reported at most once per ``REPORT_INTERVAL_S`` for
``max_connections``, and for ``max_unverified_per_source`` once per interval per source
(remembered for the ``REPORTED_SOURCES`` most recently refused): a flood cannot flood the log
too, and the log still names who floods.

Sans-IO: values in, values out; the caller owns the sockets, the clock and the log.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

LimitName = Literal["max_connections", "max_unverified_per_source"]
REPORT_INTERVAL_S = 10.0
REPORTED_SOURCES = 256


@dataclass
class Ticket:
    """One admitted connection; give it back with :meth:`ConnectionLimits.release`."""

    source: str
    unverified: bool
    released: bool = False


@dataclass(frozen=True)
class Refusal:
    """A connection refused by a limit.

    Attributes:
        limit: which limit refused it.
        report: refusals since the last report, this one included, when it is time to
            report them (once per ``REPORT_INTERVAL_S`` for ``max_connections``, once per
            interval per source for ``max_unverified_per_source``); 0 when it is not.
    """

    limit: LimitName
    report: int


@dataclass(frozen=True)
class LimitStatistics:
    """What the limits hold and have refused."""

    connections: int
    unverified: int
    unverified_sources: int
    max_connections: int
    max_unverified_per_source: int
    refused: dict[str, int]


@dataclass
class _Reporting:
    unreported: int = 0
    last_report: float | None = None


@dataclass
class ConnectionLimits:
    """Admission of connections to one proxy (see the module's design note).

    Attributes:
        max_connections: connections held at once; the next is refused.
        max_unverified_per_source: unverified connections from one source at once; None
            for no per-source limit (the outbound proxy: its clients are local processes).
    """

    max_connections: int
    max_unverified_per_source: int | None = None
    _connections: int = 0
    _unverified: dict[str, int] = field(default_factory=dict)
    _refused: dict[str, int] = field(default_factory=dict)
    _reporting: dict[tuple[str, str], _Reporting] = field(default_factory=dict)

    def admit(self, source: str, now: float) -> Ticket | Refusal:
        """Admit a connection from *source* (an address), or say which limit refuses it."""
        if self._connections >= self.max_connections:
            return self._refuse("max_connections", "", now)
        per_source = self.max_unverified_per_source
        if per_source is not None:
            held = self._unverified.get(source, 0)
            if held >= per_source:
                return self._refuse("max_unverified_per_source", source, now)
            self._unverified[source] = held + 1
        self._connections += 1
        return Ticket(source, unverified=per_source is not None)

    def verified(self, ticket: Ticket) -> None:
        """*ticket*'s peer is verified (or admitted as plaintext): it leaves its source's
        unverified count. Idempotent."""
        if ticket.unverified and not ticket.released:
            ticket.unverified = False
            self._end_unverified(ticket.source)

    def release(self, ticket: Ticket) -> None:
        """The connection of *ticket* is closed. Idempotent."""
        if ticket.released:
            return
        self.verified(ticket)
        ticket.released = True
        self._connections -= 1

    def statistics(self) -> LimitStatistics:
        return LimitStatistics(
            connections=self._connections,
            unverified=sum(self._unverified.values()),
            unverified_sources=len(self._unverified),
            max_connections=self.max_connections,
            max_unverified_per_source=self.max_unverified_per_source or 0,
            refused=dict(self._refused),
        )

    def _end_unverified(self, source: str) -> None:
        held = self._unverified.get(source, 0) - 1
        if held > 0:
            self._unverified[source] = held
        else:  # sources with nothing unverified are forgotten: the table stays bounded
            self._unverified.pop(source, None)

    def _refuse(self, limit: LimitName, source: str, now: float) -> Refusal:
        self._refused[limit] = self._refused.get(limit, 0) + 1
        # Most recently refused last; beyond the bound the least recent is forgotten (its
        # next refusal is then reported at once).
        state = self._reporting.pop((limit, source), None) or _Reporting()
        self._reporting[(limit, source)] = state
        if len(self._reporting) > REPORTED_SOURCES:
            del self._reporting[next(iter(self._reporting))]
        state.unreported += 1
        if state.last_report is not None and now - state.last_report < REPORT_INTERVAL_S:
            return Refusal(limit, report=0)
        report, state.unreported, state.last_report = state.unreported, 0, now
        return Refusal(limit, report=report)
