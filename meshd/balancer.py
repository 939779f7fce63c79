"""Choosing an upstream endpoint: sans-IO load-balancing state.

The outbound proxy asks :meth:`RoundRobin.attempt_order` for the order in which to try a
service's endpoints: the first is the balanced choice, the rest are where a failed connect
is retried ("connect retries on another endpoint"). The picker mutates only its own cursor
and returns a value; the caller performs the I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class BalancerStatistics:
    """How many picks were made, per service."""

    picks: tuple[tuple[str, int], ...]


class RoundRobin:
    """Round robin across each service's endpoints, independently per service."""

    def __init__(self) -> None:
        self._cursor: dict[str, int] = {}
        self._picks: dict[str, int] = {}

    def attempt_order(
        self, service: str, endpoints: Sequence[T], *, max_attempts: int = 3
    ) -> tuple[T, ...]:
        """The endpoints to try for one connection, balanced choice first.

        Args:
            service: the destination service (each has its own rotation).
            endpoints: the service's passing endpoints in canonical (sorted) order, so the
                rotation is stable across snapshots that only add or drop one endpoint.
            max_attempts: at most this many endpoints are returned (1 + retries).

        Returns:
            Up to *max_attempts* distinct endpoints; empty if there are none.
        """
        if not endpoints or max_attempts < 1:
            return ()
        start = self._cursor.get(service, 0) % len(endpoints)
        self._cursor[service] = start + 1
        self._picks[service] = self._picks.get(service, 0) + 1
        count = min(max_attempts, len(endpoints))
        return tuple(endpoints[(start + i) % len(endpoints)] for i in range(count))

    def statistics(self) -> BalancerStatistics:
        """The number of picks per service so far."""
        return BalancerStatistics(picks=tuple(sorted(self._picks.items())))
