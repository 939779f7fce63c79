"""On-demand discovery of an unknown original destination, decided without I/O.

When the outbound proxy meets an ``(ip, port)`` the snapshot cannot map, the agent asks
Consul which service lives there with a node-scoped point lookup (see
docs/adr/004-bounded-upstream-set.md) and, on a hit, adds the service to the watch set.
This module holds the two decisions: which service an answer names
(:func:`match_destination`) and whether a lookup should run at all
(:class:`DestinationCache`: one lookup in flight per destination, misses remembered for a
while so traffic to a non-mesh address does not become a stream of Consul queries).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class NodeService:
    """A service instance on a node, at the address it is reached at."""

    service: str
    address: str
    port: int


def match_destination(services: Iterable[NodeService], address: str, port: int) -> str | None:
    """The one service reached at ``address:port``; None if none or several claim it."""
    names = {s.service for s in services if (s.address, s.port) == (address, port)}
    return next(iter(names)) if len(names) == 1 else None


@dataclass(frozen=True)
class DiscoveryStatistics:
    """Counters of a :class:`DestinationCache`."""

    lookups: int
    found: int
    not_found: int
    suppressed: int
    in_flight: int
    remembered_misses: int


class DestinationCache:
    """Decides whether to look a destination up; remembers misses for ``negative_ttl_s``."""

    def __init__(self, *, negative_ttl_s: float = 30.0, max_misses: int = 4096) -> None:
        """Empty cache (times are monotonic seconds supplied by the caller)."""
        self._ttl = negative_ttl_s
        self._max = max_misses
        self._in_flight: set[tuple[str, int]] = set()
        self._misses: dict[tuple[str, int], float] = {}  # destination -> expiry
        self._counts = {"lookups": 0, "found": 0, "not_found": 0, "suppressed": 0}

    def begin(self, address: str, port: int, now: float) -> bool:
        """True if a lookup of ``address:port`` should start now (the caller must finish it)."""
        key = (address, port)
        expiry = self._misses.get(key)
        if expiry is not None and now >= expiry:
            del self._misses[key]
            expiry = None
        if key in self._in_flight or expiry is not None:
            self._counts["suppressed"] += 1
            return False
        self._in_flight.add(key)
        self._counts["lookups"] += 1
        return True

    def finish(self, address: str, port: int, service: str | None, now: float) -> None:
        """Record a lookup's outcome (None: not a mesh service, or the lookup failed)."""
        key = (address, port)
        self._in_flight.discard(key)
        if service is not None:
            self._counts["found"] += 1
            return
        self._counts["not_found"] += 1
        self._misses.pop(key, None)
        self._misses[key] = now + self._ttl
        while len(self._misses) > self._max:  # oldest first: dicts keep insertion order
            del self._misses[next(iter(self._misses))]

    def statistics(self) -> DiscoveryStatistics:
        """A frozen view of the counters."""
        return DiscoveryStatistics(
            lookups=self._counts["lookups"],
            found=self._counts["found"],
            not_found=self._counts["not_found"],
            suppressed=self._counts["suppressed"],
            in_flight=len(self._in_flight),
            remembered_misses=len(self._misses),
        )
