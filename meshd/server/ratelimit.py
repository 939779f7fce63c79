"""Per-client token buckets for the signing API: pure, the caller passes the time.

Each client address has a bucket of ``burst`` tokens refilled at ``rate_per_s``; a request
takes one token or is refused (429). Memory is bounded: at most ``max_clients`` buckets are
kept, and when full the least recently used one is dropped (a dropped client simply starts
again with a full bucket, which is never more than ``burst`` requests of advantage).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True)
class RateLimiterStatistics:
    """Counters of a :class:`RateLimiter`."""

    clients: int
    allowed: int
    limited: int


class RateLimiter:
    """Token buckets keyed by client address."""

    def __init__(self, *, rate_per_s: float, burst: int, max_clients: int = 4096) -> None:
        if not rate_per_s > 0 or burst < 1 or max_clients < 1:
            raise ValueError("rate limiter: rate_per_s > 0, burst >= 1, max_clients >= 1")
        self._rate = rate_per_s
        self._burst = float(burst)
        self._max = max_clients
        # client -> (tokens, time of last update)
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._allowed = 0
        self._limited = 0

    def take(self, client: str, now: float) -> bool:
        """Spend one token of *client*'s bucket.

        Args:
            client: the client's address.
            now: a monotonic time in seconds.

        Returns:
            True if allowed; False if the client must be answered 429.
        """
        tokens, last = self._buckets.pop(client, (self._burst, now))
        # max(0, ...): a clock that went backwards must not drain the bucket.
        tokens = min(self._burst, tokens + max(0.0, now - last) * self._rate)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
            self._allowed += 1
        else:
            self._limited += 1
        self._buckets[client] = (tokens, now)
        while len(self._buckets) > self._max:
            self._buckets.popitem(last=False)
        return allowed

    def statistics(self) -> RateLimiterStatistics:
        """Bucket count and decisions so far."""
        return RateLimiterStatistics(len(self._buckets), self._allowed, self._limited)
