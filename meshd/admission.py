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
* ``max_failures_per_source``: TLS handshakes or peer verifications from one source that
  failed within ``failure_window_s`` (10 s). A full handshake costs the proxy a key
  exchange and a signature, and one that fails buys the client nothing but that cost; once
  a source reaches the limit, its connections are refused on arrival, before any
  handshake, until the window that began with its first counted failure ends. An honest
  peer fails only when its certificate is wrong, and then fails anyway.

A connection over either limit is refused at once (the caller resets it): a client learns
at once instead of waiting in the kernel's backlog behind connections that will never be
served. Refusals are counted here and reported at most once per ``REPORT_INTERVAL_S`` for
``max_connections``, and for the per-source limits once per interval per source
(remembered for the ``REPORTED_SOURCES`` most recently refused): a flood cannot flood the log
too, and the log still names who floods.

Sans-IO: values in, values out; the caller owns the sockets, the clock and the log.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Literal

LimitName = Literal["max_connections", "max_unverified_per_source", "max_failures_per_source"]
REPORT_INTERVAL_S = 10.0
REPORTED_SOURCES = 256
FAILURE_WINDOW_S = 10.0
#: An IPv6 source counts as its /64: a host usually holds a whole one, and per address it
#: could take every slot, and dodge the failure limit, by rotating addresses.
IPV6_SOURCE_PREFIX = 64

#: Sources whose failures are remembered; beyond it the one that failed least recently is
#: forgotten (a flood from more addresses than this is bounded by the other limits).
FAILING_SOURCES = 4096


def source_of(client: str) -> str:
    """What a connection from *client* (``address:port``, as ``getpeername`` gives it)
    counts against: its IPv4 address (also when IPv4-mapped), or its IPv6 /64."""
    host = client.rpartition(":")[0] or client
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        keep = 128 - IPV6_SOURCE_PREFIX
        return str(ipaddress.IPv6Network((int(ip) >> keep << keep, IPV6_SOURCE_PREFIX)))
    return str(ip)


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
            interval per source for the per-source limits); 0 when it is not.
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
    max_failures_per_source: int
    failing_sources: int
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
        max_failures_per_source: failed handshakes or verifications from one source within
            *failure_window_s* before its connections are refused on arrival; None for no
            limit.
        failure_window_s: the window those failures are counted in.
    """

    max_connections: int
    max_unverified_per_source: int | None = None
    max_failures_per_source: int | None = None
    failure_window_s: float = FAILURE_WINDOW_S
    _connections: int = 0
    _failures: dict[str, tuple[float, int]] = field(default_factory=dict)
    _unverified: dict[str, int] = field(default_factory=dict)
    _refused: dict[str, int] = field(default_factory=dict)
    _reporting: dict[tuple[str, str], _Reporting] = field(default_factory=dict)

    def admit(self, source: str, now: float) -> Ticket | Refusal:
        """Admit a connection from *source* (an address), or say which limit refuses it."""
        if self._connections >= self.max_connections:
            return self._refuse("max_connections", "", now)
        if self._failing(source, now):
            return self._refuse("max_failures_per_source", source, now)
        per_source = self.max_unverified_per_source
        if per_source is not None:
            held = self._unverified.get(source, 0)
            if held >= per_source:
                return self._refuse("max_unverified_per_source", source, now)
            self._unverified[source] = held + 1
        self._connections += 1
        return Ticket(source, unverified=per_source is not None)

    def failed(self, ticket: Ticket, now: float) -> None:
        """*ticket*'s TLS handshake or peer verification failed at *now*: it counts against
        its source (see ``max_failures_per_source``)."""
        if self.max_failures_per_source is None:
            return
        start, count = self._failures.pop(ticket.source, (now, 0))
        if now - start >= self.failure_window_s:
            start, count = now, 0
        self._failures[ticket.source] = (start, count + 1)  # most recent window last
        if len(self._failures) > FAILING_SOURCES:
            del self._failures[next(iter(self._failures))]

    def _failing(self, source: str, now: float) -> bool:
        limit = self.max_failures_per_source
        if limit is None or source not in self._failures:
            return False
        start, count = self._failures[source]
        if now - start >= self.failure_window_s:
            del self._failures[source]  # its window is over: forgotten, and admitted
            return False
        return count >= limit

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
            max_failures_per_source=self.max_failures_per_source or 0,
            failing_sources=len(self._failures),
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
