"""Consul's blocking-query rules as a small state machine, with no I/O.

The rules are Consul's own (``api/watch/plan.go`` and the "blocking queries" docs):

* The first request uses index 0: an immediate read.
* An index that goes backwards (a snapshot restore, a fresh server) resets to 0, so the next
  request is again an immediate read instead of blocking on a number that will never come.
* An index of 0 in an answer is a Consul bug that would make every query return at once:
  treat it as 1.
* Results equal to the last one delivered are skipped (queries wake for unrelated writes).
* Errors back off exponentially with jitter, capped; a success resets the backoff.

One addition: after an error the next request uses index 0. The error may have been a
Consul restart with a fresh, lower index, and a blocking query on the stale index would sit
out its whole wait before the backwards rule could fire. The cost is one immediate read.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class WatchStatistics:
    """What a watch has seen; times are on the trio clock (``trio.current_time()``).

    Attributes:
        name: the watch's name.
        index: the index the next request will send.
        requests: answers received.
        changes: results delivered (the first result counts).
        resets: times the index was reset because it went backwards.
        errors: failed requests in total.
        consecutive_errors: failed requests since the last answer.
        last_change_at: when a result was last delivered, or None.
        last_error: the last error's message, or None.
    """

    name: str
    index: int = 0
    requests: int = 0
    changes: int = 0
    resets: int = 0
    errors: int = 0
    consecutive_errors: int = 0
    last_change_at: float | None = None
    last_error: str | None = None


@dataclass(frozen=True)
class Backoff:
    """Capped exponential backoff with "equal jitter": a delay in [d/2, d]."""

    initial_s: float = 0.5
    max_s: float = 20.0

    def __post_init__(self) -> None:
        if not 0 < self.initial_s <= self.max_s:
            raise ValueError(f"backoff: need 0 < initial_s <= max_s, got {self}")

    def delay(self, attempt: int, jitter: float) -> float:
        """The delay before retry number *attempt* (1-based), with *jitter* in [0, 1)."""
        # Cap the exponent too, so a long outage cannot overflow the float.
        ceiling = min(self.max_s, self.initial_s * 2.0 ** min(attempt - 1, 64))
        return ceiling / 2 + ceiling / 2 * min(max(jitter, 0.0), 1.0)


class BlockingQueryPlan(Generic[T]):
    """Decides the next index, whether an answer is news, and how long to back off."""

    def __init__(self, name: str, backoff: Backoff | None = None) -> None:
        self._backoff = backoff or Backoff()
        self._stats = WatchStatistics(name=name)
        self._delivered = False
        self._last: T | None = None

    @property
    def next_index(self) -> int:
        """The index to send with the next request (0: an immediate read)."""
        return self._stats.index

    def statistics(self) -> WatchStatistics:
        """A frozen snapshot of the counters."""
        return self._stats

    def on_answer(self, index: int, result: T, now: float) -> bool:
        """Record an answer.

        Args:
            index: the ``X-Consul-Index`` of the answer.
            result: the decoded result (compared with ``==``).
            now: the current time, for statistics.

        Returns:
            True if *result* should be delivered (first result, or different from the last).
        """
        stats = self._stats
        previous = stats.index
        resets = stats.resets
        if index < previous:
            index, resets = 0, resets + 1
        elif index < 1:
            index = 1
        news = not self._delivered or result != self._last
        if news:
            self._delivered, self._last = True, result
        self._stats = replace(
            stats,
            index=index,
            requests=stats.requests + 1,
            changes=stats.changes + news,
            resets=resets,
            consecutive_errors=0,
            last_change_at=now if news else stats.last_change_at,
        )
        return news

    def on_error(self, cause: str, jitter: float) -> float:
        """Record a failed request.

        Args:
            cause: the error message (kept for statistics).
            jitter: a random number in [0, 1).

        Returns:
            Seconds to wait before the next request.
        """
        stats = self._stats
        attempt = stats.consecutive_errors + 1
        self._stats = replace(
            stats, index=0, errors=stats.errors + 1, consecutive_errors=attempt, last_error=cause
        )
        return self._backoff.delay(attempt, jitter)
