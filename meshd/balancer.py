"""Choosing an upstream endpoint: sans-IO load-balancing state.

The outbound proxy asks :meth:`RoundRobin.attempt_order` for the order in which to try a
service's endpoints: the first is the balanced choice, the rest are where a failed connect
is retried ("connect retries on another endpoint"), as far as the destination's
:class:`RetryBudget` allows. The picker mutates only its own state and returns a value;
the caller performs the I/O and reports how each connect went.

**Outlier ejection.** Consul's health checks run on the instance's own host, so they keep
passing when the path to it is broken (a black-holed address, a dead inbound proxy, a
partition): every connection whose balanced choice is that endpoint would wait for the
connect timeout before its retry. :class:`Outliers` remembers connect failures by
``(address, port)``: after :data:`EJECT_AFTER` consecutive failures the endpoint is ejected
for :data:`BASE_EJECTION_S`, doubling with each ejection in a row up to
:data:`MAX_EJECTION_S`. An ejected endpoint is not dropped: it goes to the back of the
attempt order, so it is still tried when everything before it failed, and a service whose
endpoints are all ejected keeps its plain rotation (ejection can reorder, never refuse).
When the ejection ends the endpoint is on probation: the next caller whose attempt order
includes it takes a *trial* and the others keep treating it as ejected for
:data:`TRIAL_S` (a half-open circuit: one connection waits on a still-dead endpoint, not
every connection started within a connect timeout). A failure on probation ejects it again
at once, for twice as long; a successful connect clears its record.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

EJECT_AFTER = 2
BASE_EJECTION_S = 10.0
MAX_EJECTION_S = 300.0
TRIAL_S = 5.0  # how long one caller's trial of an endpoint on probation keeps it from others
MAX_TRACKED = 4096  # endpoints with a failure on record; the oldest records go first
RETRY_RATIO = 0.2  # retries per connection a destination may have over the window ...
RETRY_MIN_PER_S = 10.0  # ... plus this many per second, whatever the traffic
RETRY_WINDOW_S = 10


@dataclass
class _Record:
    failures: int = 0  # consecutive connect failures
    ejections: int = 0  # ejections in a row (the next lasts BASE * 2**ejections)
    until: float = 0.0  # ejected until this time (the caller's clock)
    trial_until: float = 0.0  # on probation, one caller is trying it until this time


@dataclass(frozen=True)
class Ejection:
    """An endpoint :meth:`Outliers.failed` has just ejected."""

    endpoint: Hashable
    seconds: float
    failures: int


class Outliers:
    """Consecutive connect failures per endpoint, and which endpoints are ejected now.

    Times are the caller's monotonic clock (seconds). Memory is bounded: at most
    *max_tracked* endpoints with a failure on record, the least recently failed forgotten
    first.
    """

    def __init__(
        self,
        *,
        eject_after: int = EJECT_AFTER,
        base_ejection_s: float = BASE_EJECTION_S,
        max_ejection_s: float = MAX_EJECTION_S,
        trial_s: float = TRIAL_S,
        max_tracked: int = MAX_TRACKED,
    ) -> None:
        if (
            eject_after < 1
            or base_ejection_s <= 0
            or max_ejection_s < base_ejection_s
            or trial_s <= 0
        ):
            raise ValueError("outlier settings out of range")
        self._eject_after = eject_after
        self._base = base_ejection_s
        self._max = max_ejection_s
        self._trial = trial_s
        self._max_tracked = max(1, max_tracked)
        self._records: dict[Hashable, _Record] = {}
        self._flagged: set[Hashable] = set()  # ejected now or on probation
        self.ejections_total = 0

    def failed(self, endpoint: Hashable, now: float) -> Ejection | None:
        """A connect to *endpoint* failed; the ejection this causes, if any.

        A failure while the endpoint is still ejected (a connect begun before) changes
        nothing; the first one after the ejection ends (probation) ejects it again, for
        twice as long.
        """
        record = self._records.pop(endpoint, None) or _Record()
        self._records[endpoint] = record  # most recently failed last
        if len(self._records) > self._max_tracked:
            oldest = next(iter(self._records))
            del self._records[oldest]
            self._flagged.discard(oldest)
        record.failures += 1
        if record.failures < self._eject_after or record.until > now:
            return None
        seconds = min(self._max, self._base * 2**record.ejections)
        record.ejections += 1
        record.until = now + seconds
        record.trial_until = 0.0
        self._flagged.add(endpoint)
        self.ejections_total += 1
        return Ejection(endpoint, seconds, record.failures)

    def succeeded(self, endpoint: Hashable) -> None:
        """A connect to *endpoint* succeeded: forget its failures and ejections."""
        if self._records.pop(endpoint, None) is not None:
            self._flagged.discard(endpoint)

    def ejected(self, endpoint: Hashable, now: float) -> bool:
        """Whether *endpoint* is ejected at *now* (or on trial by another caller)."""
        record = self._records.get(endpoint)
        return record is not None and (record.until > now or record.trial_until > now)

    def take_trial(self, endpoint: Hashable, now: float) -> None:
        """The caller will try *endpoint*: if it is on probation, the others keep away from
        it for the trial's duration (a half-open circuit: one caller pays, not all)."""
        record = self._records.get(endpoint)
        if record is not None and endpoint in self._flagged and record.until <= now:
            record.trial_until = now + self._trial

    def flagged(self) -> bool:
        """Whether any endpoint is ejected or on probation (cheap: a set's size)."""
        return bool(self._flagged)

    def ejected_now(self, now: float) -> list[Hashable]:
        """Every endpoint ejected at *now* (for statistics)."""
        return [e for e in self._flagged if self._records[e].until > now]


@dataclass
class _Second:
    second: int
    connections: int = 0
    retries: int = 0


class RetryBudget:
    """How many connect retries a destination may have: a share of its recent connections.

    A retry is allowed while the retries of the last *window_s* seconds stay below
    ``ratio`` times that window's connections plus ``min_per_s`` times *window_s* (Finagle's and
    Linkerd's budget: 20 % and 10 per second over 10 s by default). When every endpoint of
    a service fails, each connection would otherwise make up to three connects: a storm on
    whatever is struggling. Counted per destination in one-second buckets, at most
    *max_services* destinations (the least recently used forgotten first).
    """

    def __init__(
        self,
        *,
        ratio: float = RETRY_RATIO,
        min_per_s: float = RETRY_MIN_PER_S,
        window_s: int = RETRY_WINDOW_S,
        max_services: int = 1024,
    ) -> None:
        if ratio < 0 or min_per_s < 0 or window_s < 1:
            raise ValueError("retry budget settings out of range")
        self._ratio = ratio
        self._reserve = min_per_s * window_s
        self._window = window_s
        self._max_services = max(1, max_services)
        self._services: dict[str, collections.deque[_Second]] = {}
        self.refused_total = 0

    def _current(self, service: str, now: float) -> collections.deque[_Second]:
        buckets = self._services.pop(service, None)
        if buckets is None:
            buckets = collections.deque()
            if len(self._services) >= self._max_services:
                del self._services[next(iter(self._services))]
        self._services[service] = buckets  # most recently used last
        second = math.floor(now)
        while buckets and buckets[0].second <= second - self._window:
            buckets.popleft()
        if not buckets or buckets[-1].second != second:
            buckets.append(_Second(second))
        return buckets

    def connection(self, service: str, now: float) -> None:
        """A new connection to *service* (its first connect) at *now*."""
        self._current(service, now)[-1].connections += 1

    def allow_retry(self, service: str, now: float) -> bool:
        """Whether one more connect retry to *service* fits the budget (then counted)."""
        buckets = self._current(service, now)
        connections = sum(b.connections for b in buckets)
        retries = sum(b.retries for b in buckets)
        if retries >= self._ratio * connections + self._reserve:
            self.refused_total += 1
            return False
        buckets[-1].retries += 1
        return True


@dataclass(frozen=True)
class BalancerStatistics:
    """How many picks were made, per service; ejections so far and endpoints ejected now."""

    picks: tuple[tuple[str, int], ...]
    ejections: int = 0
    ejected: tuple[str, ...] = ()


class RoundRobin:
    """Round robin across each service's endpoints, independently per service, with
    ejected endpoints (:class:`Outliers`) moved to the back of each attempt order."""

    def __init__(
        self, outliers: Outliers | None = None, retries: RetryBudget | None = None
    ) -> None:
        self._cursor: dict[str, int] = {}
        self._picks: dict[str, int] = {}
        self.outliers = outliers if outliers is not None else Outliers()
        self.retries = retries if retries is not None else RetryBudget()

    def attempt_order(
        self,
        service: str,
        endpoints: Sequence[T],
        *,
        max_attempts: int = 3,
        now: float = 0.0,
        key: Callable[[T], Hashable] | None = None,
    ) -> tuple[T, ...]:
        """The endpoints to try for one connection, balanced choice first.

        Args:
            service: the destination service (each has its own rotation).
            endpoints: the service's passing endpoints in canonical (sorted) order, so the
                rotation is stable across snapshots that only add or drop one endpoint.
            max_attempts: at most this many endpoints are returned (1 + retries).
            now: the time on the clock :class:`Outliers` is fed with.
            key: what identifies an endpoint to :class:`Outliers` (default: itself).

        Returns:
            Up to *max_attempts* distinct endpoints, those not ejected first (in rotation
            order), then ejected ones; empty if there are none.
        """
        if not endpoints or max_attempts < 1:
            return ()
        n = len(endpoints)
        start = self._cursor.get(service, 0) % n
        self._cursor[service] = start + 1
        self._picks[service] = self._picks.get(service, 0) + 1
        count = min(max_attempts, n)
        if not self.outliers.flagged():
            return tuple(endpoints[(start + i) % n] for i in range(count))
        ident = key or (lambda e: e)
        usable: list[T] = []
        ejected: list[T] = []
        for i in range(n):
            endpoint = endpoints[(start + i) % n]
            endpoint_key = ident(endpoint)
            if not self.outliers.ejected(endpoint_key, now):
                self.outliers.take_trial(endpoint_key, now)
                usable.append(endpoint)
                if len(usable) == count:
                    break
            elif len(ejected) < count:
                ejected.append(endpoint)
        return tuple((usable + ejected)[:count])

    def statistics(self, now: float = 0.0) -> BalancerStatistics:
        """Picks per service so far, and the ejections."""
        return BalancerStatistics(
            picks=tuple(sorted(self._picks.items())),
            ejections=self.outliers.ejections_total,
            ejected=tuple(sorted(str(e) for e in self.outliers.ejected_now(now))),
        )
