"""Leader election among meshd servers: a Consul session lock on ``<kv_prefix>ca/leader``.

Every server can sign; only the leader runs the duties that must happen once (root
rotation steps, retiring roots). The lock follows Consul's documented recipe: create a
session with a TTL, ``PUT ?acquire=<session>``, renew the session at a third of its TTL,
and watch the key with blocking queries. Leadership ends — and the duties are cancelled —
as soon as the session cannot be renewed or the key no longer names our session; Consul's
lock-delay keeps a new leader from starting duties while the old one may still run them.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from meshd.consul.client import ConsulClient
from meshd.consul.errors import ConsulError
from meshd.logevents import log_event
from meshd.renewal import backoff

log = logging.getLogger("meshd.server.leader")
Duties = Callable[[], Awaitable[None]]
ACQUIRE_RETRY_S = 0.5


class _LeadershipLost(Exception):
    pass


@dataclass(frozen=True)
class LeadershipStatistics:
    """Whether this server leads, and how often it was elected."""

    is_leader: bool
    elections_won: int
    errors: int


class Leadership:
    """This server's view of the lock; :meth:`serve` campaigns forever."""

    def __init__(
        self,
        consul: ConsulClient,
        *,
        key: str,
        name: str,
        ttl_s: float = 15.0,
        lock_delay_s: int = 15,
    ) -> None:
        self._consul = consul
        self._key = key
        self._name = name
        self._ttl = ttl_s
        self._lock_delay = lock_delay_s
        self.is_leader = False
        self._won = 0
        self._errors = 0
        self.changed = trio.Event()

    async def serve(
        self, duties: Duties, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Campaign for the lock forever, running *duties* while it is held.

        Args:
            duties: runs while we lead; cancelled when leadership ends.
            task_status: started once the first campaign began.
        """
        task_status.started()
        attempt = 0
        while True:
            won_before = self._won
            try:
                await self._one_session(duties)
            except* (ConsulError, _LeadershipLost) as group:
                # Nurseries wrap what their tasks raise; anything else (a bug in a duty)
                # propagates and stops the server loudly.
                self._errors += 1
                reason = str(group.exceptions[0])[:200]
                log_event(log, logging.WARNING, "leader", state="lost", reason=reason)
            self._set(False)
            attempt = 0 if self._won != won_before else min(attempt + 1, 10)
            await trio.sleep(backoff(attempt, base=0.5, cap=30.0, jitter_fraction=0.5))

    async def _one_session(self, duties: Duties) -> None:
        session = await self._consul.session_create(
            f"meshd-leader-{self._name}", ttl_s=self._ttl, lock_delay_s=self._lock_delay
        )
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._renew, session)
                await self._campaign(session, duties)
        finally:
            with trio.move_on_after(2.0, shield=True), contextlib.suppress(ConsulError):
                # On failure the session expires on its own within its TTL.
                await self._consul.session_destroy(session)

    async def _renew(self, session: str) -> None:
        while True:
            await trio.sleep(self._ttl / 3)
            try:
                await self._consul.session_renew(session)
            except ConsulError as exc:
                raise _LeadershipLost(f"session renewal failed: {exc}") from exc

    async def _campaign(self, session: str, duties: Duties) -> None:
        while True:
            if await self._consul.kv_put(self._key, self._name.encode(), acquire=session):
                self._won += 1
                self._set(True)
                log_event(log, logging.INFO, "leader", state="elected", name=self._name)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(duties)
                    await self._wait_key(lambda s: s != session)
                    nursery.cancel_scope.cancel()
                raise _LeadershipLost("the lock key no longer names our session")
            await self._wait_key(lambda s: s is None)
            # The key is free, but Consul's lock-delay may still refuse us: do not spin.
            await trio.sleep(ACQUIRE_RETRY_S)

    async def _wait_key(self, until: Callable[[str | None], bool]) -> None:
        index = 0
        while True:
            new_index, entry = await self._consul.kv_get(self._key, index=index, wait_s=self._ttl)
            holder = None if entry is None else entry.session
            if until(holder):
                return
            # Consul's rules: an index that went backwards resets; never block on 0.
            index = 1 if new_index < index or new_index < 1 else new_index

    def _set(self, leader: bool) -> None:
        if leader != self.is_leader:
            self.is_leader = leader
            self.changed.set()
            self.changed = trio.Event()

    def statistics(self) -> LeadershipStatistics:
        """Current state and counters."""
        return LeadershipStatistics(self.is_leader, self._won, self._errors)
