"""The latest published snapshot, for readers that only ever want the newest.

Kept apart from :mod:`agent.snapshots` (which needs the Consul client) so that a data-path
worker (:mod:`agent.worker`) holds snapshots without loading what it never uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import trio

from meshd.snapshot import Snapshot


@dataclass(frozen=True)
class HolderStatistics:
    """State of a :class:`SnapshotHolder`."""

    version: int | None
    published: int
    waiting: int


class SnapshotHolder:
    """The latest published snapshot; readers never queue, they skip to the newest."""

    def __init__(self, initial: Snapshot | None = None) -> None:
        """Hold *initial* (e.g. the persisted snapshot) until something newer arrives."""
        self._current = initial
        self._changed = trio.Event()
        self._published = 0
        self._waiting = 0

    def current(self) -> Snapshot | None:
        """The newest snapshot, or None before the first one."""
        return self._current

    def publish(self, snapshot: Snapshot) -> bool:
        """Make *snapshot* current if it is newer; return whether it was."""
        if self._current is not None and snapshot.version <= self._current.version:
            return False
        self._current = snapshot
        self._published += 1
        self._changed.set()
        self._changed = trio.Event()
        return True

    async def wait_newer(self, version: int | None) -> Snapshot:
        """Wait for a snapshot newer than *version* (None: any) and return the newest."""
        self._waiting += 1
        try:
            while self._current is None or (
                version is not None and self._current.version <= version
            ):
                await self._changed.wait()
        finally:
            self._waiting -= 1
        return self._current

    def statistics(self) -> HolderStatistics:
        """A frozen view of the holder."""
        version = None if self._current is None else self._current.version
        return HolderStatistics(version, self._published, self._waiting)
