"""A Consul blocking query as an async iterator of changed results.

The rules live in :class:`~meshd.consul.plan.BlockingQueryPlan`; this driver only performs
the requests and sleeps the backoff. Usage::

    watch = Watch(lambda index, wait_s: consul.kv_list("meshd/intentions/", index=index,
                                                       wait_s=wait_s), name="intentions")
    async for entries in watch:
        ...

The first result is always delivered; afterwards only results that differ. Consul errors
never end the iteration: they are counted, logged and retried with backoff, so a watch
survives Consul restarts. Anything that is not a :class:`ConsulError` is a bug and
propagates.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import trio

from meshd.consul.errors import ConsulError
from meshd.consul.plan import Backoff, BlockingQueryPlan, WatchStatistics
from meshd.logevents import log_event

T = TypeVar("T")
Fetch = Callable[[int, float], Awaitable[tuple[int, T]]]

log = logging.getLogger(__name__)


class Watch(Generic[T]):
    """Repeats a blocking query, yielding each new result.

    A watch is one iterator: iterate it from one task at a time.
    """

    def __init__(
        self,
        fetch: Fetch[T],
        *,
        name: str,
        wait_s: float = 60.0,
        backoff: Backoff | None = None,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        """Create a watch; nothing runs until it is iterated.

        Args:
            fetch: ``fetch(index, wait_s) -> (index, result)``, usually a bound read method
                of :class:`~meshd.consul.client.ConsulClient`; it must raise ConsulError on
                failure.
            name: names the watch in logs and statistics.
            wait_s: how long each blocking query may wait at Consul.
            backoff: retry delays after errors.
            jitter: source of random numbers in [0, 1) for the backoff.
        """
        if not wait_s > 0:
            raise ValueError(f"watch {name}: wait_s must be > 0, got {wait_s!r}")
        self._fetch = fetch
        self._wait_s = wait_s
        self._jitter = jitter
        self._plan: BlockingQueryPlan[T] = BlockingQueryPlan(name, backoff)

    def statistics(self) -> WatchStatistics:
        """Counters, current index, last change and last error, as a frozen value."""
        return self._plan.statistics()

    def __aiter__(self) -> Watch[T]:
        return self

    async def __anext__(self) -> T:
        """Block until Consul reports a result different from the last one delivered.

        Raises:
            Nothing of its own: Consul errors are retried forever; cancel to stop.
        """
        while True:
            try:
                index, result = await self._fetch(self._plan.next_index, self._wait_s)
            except ConsulError as exc:
                delay = self._plan.on_error(str(exc), self._jitter())
                stats = self._plan.statistics()
                log_event(log, logging.WARNING, "watch_failed", watch=stats.name,
                          error=str(exc), errors_in_a_row=stats.consecutive_errors,
                          retry_in_s=round(delay, 1))  # fmt: skip
                await trio.sleep(delay)
                continue
            if self._plan.on_answer(index, result, trio.current_time()):
                return result
