"""Driver of the snapshot pipeline: Consul watches -> reducer -> holder -> disk.

Design note. One task owns the :class:`~meshd.snapshot.Reducer`. Watch tasks (one per
input: mesh config, trust bundle, intentions, and each upstream in the bounded watch set)
turn Consul results into reducer events and send them over one channel. The owner applies
each event, starts or stops upstream watches when the reducer's watch set moves, and,
once the reducer is ready, publishes at most once per coalesce window after the first
change. A published snapshot goes to the :class:`SnapshotHolder` (latest value; readers
skip to the newest) and is persisted 0600 atomically. At start the persisted snapshot is
loaded and published before any watch runs, so a restarted agent serves last-known-good
while Consul is away.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import math
import time
from collections.abc import AsyncIterable, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from agent.holder import HolderStatistics, SnapshotHolder
from meshd.config import ServiceConfig
from meshd.consul import ConsulClient, KVEntry, ServiceInstance, Watch, WatchStatistics
from meshd.keyfile import KeyFileError, read_secret, write_secret
from meshd.logevents import log_event
from meshd.snapshot import (
    BundleChanged,
    Endpoint,
    EndpointsChanged,
    Event,
    IntentionsChanged,
    LocalService,
    LocalServicesChanged,
    MeshConfigChanged,
    Reducer,
    ReducerStatistics,
    Snapshot,
    SnapshotFormatError,
    UpstreamRequested,
    from_json,
    to_json,
)

log = logging.getLogger("meshd.agent.snapshots")
SNAPSHOT_FILE = "snapshot.json"
_EVENT_BUFFER = 256


def load_persisted(state_dir: Path) -> Snapshot | None:
    """The snapshot persisted in *state_dir*, or None if absent or unreadable (logged)."""
    path = state_dir / SNAPSHOT_FILE
    if not path.exists():
        return None
    try:
        return from_json(read_secret(path))
    except (KeyFileError, SnapshotFormatError) as exc:
        log_event(log, logging.WARNING, "persisted_snapshot_ignored", path=str(path),
                  reason=str(exc))  # fmt: skip
        return None


def persist(state_dir: Path, snapshot: Snapshot) -> None:
    """Write *snapshot* to ``state_dir/snapshot.json``, mode 0600, atomically (blocking)."""
    write_secret(state_dir / SNAPSHOT_FILE, to_json(snapshot))


def local_services_from_config(
    services: Iterable[ServiceConfig], uids: Mapping[str, int] | None = None
) -> tuple[LocalService, ...]:
    """Turn ``meshd.config`` service definitions into the snapshot's :class:`LocalService`;
    *uids*: the resolved ``user`` of the services that name one, by service id."""
    uids = uids or {}
    return tuple(
        LocalService(s.name, s.id, s.port, s.protocol, tuple(s.upstreams), uids.get(s.id))
        for s in services
    )


def is_ip_address(address: str) -> bool:
    """Whether *address* is an IPv4 or IPv6 address (Consul also takes host names)."""
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return False
    return True


def endpoint_of(instance: ServiceInstance) -> Endpoint:
    """A snapshot endpoint for one passing Consul instance."""
    return Endpoint(
        instance.address, instance.port, instance.node, instance.service_id, instance.meta
    )


@dataclass(frozen=True)
class PipelineStatistics:
    """State of the whole pipeline, for the admin endpoint."""

    holder: HolderStatistics
    reducer: ReducerStatistics
    upstream_watches: frozenset[str]
    watches: tuple[WatchStatistics, ...]
    persisted: int
    persist_errors: int
    dropped_requests: int
    retired_watch_errors: int = 0

    @property
    def watch_errors(self) -> int:
        """Failed Consul requests of every watch since the agent started (also of watches
        since stopped, so the count never goes down)."""
        return self.retired_watch_errors + sum(w.errors for w in self.watches)

    @property
    def watches_failing(self) -> tuple[str, ...]:
        """The watches whose latest request failed (their data is the last known)."""
        return tuple(w.name for w in self.watches if w.consecutive_errors > 0)


class SnapshotPipeline:
    """Handle on a running :func:`serve_snapshots`: the holder plus inputs from the agent."""

    def __init__(
        self, holder: SnapshotHolder, reducer: Reducer, send: trio.MemorySendChannel[Event]
    ) -> None:
        """Wrap the pieces :func:`serve_snapshots` (or a test) assembled."""
        self.holder = holder
        self._watches: dict[str, Watch[Any]] = {}
        self._reducer = reducer
        self._send = send
        self._upstream_watches: dict[str, trio.CancelScope] = {}
        self._reported_unwatched: frozenset[str] = frozenset()
        self._persisted = 0
        self._retired_watch_errors = 0
        self._persist_errors = 0
        self._dropped = 0

    def request_upstream(self, service: str) -> None:
        """Ask for *service*'s endpoints (the outbound proxy met it unmapped); never blocks."""
        self._offer(UpstreamRequested(service))

    def update_local_services(self, services: tuple[LocalService, ...]) -> None:
        """Replace the local service list (``services.d/`` changed); never blocks."""
        self._offer(LocalServicesChanged(services))

    def track(self, watch: Watch[Any]) -> Watch[Any]:
        """Include *watch* in :meth:`statistics` (until :meth:`untrack`); returns it."""
        self._watches[watch.statistics().name] = watch
        return watch

    def untrack(self, watch: Watch[Any]) -> None:
        """Stop reporting *watch*."""
        stats = watch.statistics()
        if self._watches.get(stats.name) is watch:  # a restarted watch of the same name stays
            del self._watches[stats.name]
            self._retired_watch_errors += stats.errors

    def _offer(self, event: Event) -> None:
        try:
            self._send.send_nowait(event)
        except trio.WouldBlock:
            self._dropped += 1  # the caller asks again; the buffer is full of newer work

    def statistics(self) -> PipelineStatistics:
        """A frozen view of the pipeline."""
        return PipelineStatistics(
            holder=self.holder.statistics(),
            reducer=self._reducer.statistics(),
            upstream_watches=frozenset(self._upstream_watches),
            watches=tuple(w.statistics() for _, w in sorted(self._watches.items())),
            persisted=self._persisted,
            persist_errors=self._persist_errors,
            dropped_requests=self._dropped,
            retired_watch_errors=self._retired_watch_errors,
        )

    async def serve_reducer(
        self,
        receive: trio.MemoryReceiveChannel[Event],
        *,
        state_dir: Path | None,
        coalesce_s: float,
        watch_upstream: Callable[[str], Awaitable[None]],
    ) -> None:
        """Apply events, keep upstream watches in step, publish coalesced snapshots. Forever.

        Args:
            receive: events from the watch tasks and the agent.
            state_dir: where to persist published snapshots (None: do not persist).
            coalesce_s: a publish happens this long after the first unpublished change.
            watch_upstream: runs the watch of one upstream until cancelled.
        """
        async with trio.open_nursery() as nursery:
            self._reconcile(nursery, watch_upstream)
            pending_since: float | None = None
            while True:
                deadline = self._deadline(pending_since, coalesce_s)
                with trio.move_on_at(deadline):
                    event = await receive.receive()
                    self._reducer.apply(event, now=trio.current_time())
                    self._reconcile(nursery, watch_upstream)
                    if pending_since is None:
                        pending_since = trio.current_time()
                    continue
                pending_since = None
                await self._publish(state_dir)

    def _deadline(self, pending_since: float | None, coalesce_s: float) -> float:
        if not self._reducer.ready():
            return math.inf
        deadline = math.inf if pending_since is None else pending_since + coalesce_s
        expiry = self._reducer.next_deadline()
        return deadline if expiry is None else min(deadline, expiry)

    def _reconcile(
        self, nursery: trio.Nursery, watch_upstream: Callable[[str], Awaitable[None]]
    ) -> None:
        wanted = self._reducer.watch_set()
        unwatched = self._reducer.statistics().unwatched
        if unwatched and unwatched != self._reported_unwatched:
            log_event(
                log,
                logging.WARNING,
                "upstreams_capped",
                watched=len(wanted),
                not_watched=sorted(unwatched)[:20],
                not_watched_count=len(unwatched),
            )
        self._reported_unwatched = unwatched
        for name in set(self._upstream_watches) - wanted:
            self._upstream_watches.pop(name).cancel()
        for name in sorted(wanted - set(self._upstream_watches)):
            scope = trio.CancelScope()
            self._upstream_watches[name] = scope
            nursery.start_soon(_run_in_scope, scope, watch_upstream, name)

    async def _publish(self, state_dir: Path | None) -> None:
        snapshot = self._reducer.build(trio.current_time(), created_at=time.time())
        if not self.holder.publish(snapshot):
            return
        log_event(log, logging.INFO, "snapshot_published", version=snapshot.version)
        if state_dir is None:
            return
        try:
            await trio.to_thread.run_sync(persist, state_dir, snapshot)
        except (OSError, KeyFileError) as exc:
            # Serving goes on from memory; only a restart during the outage loses this one.
            self._persist_errors += 1
            log_event(log, logging.WARNING, "snapshot_persist_failed",
                      version=snapshot.version, error=str(exc))  # fmt: skip
        else:
            self._persisted += 1


async def _run_in_scope(
    scope: trio.CancelScope, run: Callable[[str], Awaitable[None]], name: str
) -> None:
    with scope:
        await run(name)


async def pump(
    source: AsyncIterable[Any], convert: Callable[[Any], Event], send: trio.MemorySendChannel[Event]
) -> None:
    """Forward each value *source* yields, converted to an event, into *send*."""
    async for value in source:
        await send.send(convert(value))


def _kv_value(result: KVEntry | None) -> bytes | None:
    return None if result is None else result.value


def _documents(prefix: str) -> Callable[[tuple[KVEntry, ...]], IntentionsChanged]:
    def convert(entries: tuple[KVEntry, ...]) -> IntentionsChanged:
        docs = {e.key[len(prefix) :]: e.value for e in entries if e.key != prefix}
        return IntentionsChanged(docs)

    return convert


async def serve_snapshots(
    consul: ConsulClient,
    *,
    prefix: str = "meshd/",
    local_services: tuple[LocalService, ...],
    state_dir: Path | None,
    coalesce_s: float = 0.05,
    hold_grace_s: float = 30.0,
    bundle_key: str = "ca/bundle",
    task_status: trio.TaskStatus[SnapshotPipeline] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the snapshot pipeline until cancelled.

    Args:
        consul: the Consul client the watches use.
        prefix: the meshd KV prefix (``meshd/``).
        local_services: what this host serves (their upstreams are watched).
        state_dir: directory of ``snapshot.json`` (loaded at start, written on publish).
        coalesce_s: publish at most once per this window after the first change.
        hold_grace_s: keep a service's last good endpoints this long when none pass.
        bundle_key: KV key of the trust bundle, relative to *prefix*.
        task_status: started with the :class:`SnapshotPipeline`, after the persisted
            snapshot (if any) is in its holder.
    """
    previous = None if state_dir is None else load_persisted(state_dir)
    reducer = Reducer(local_services=local_services, hold_grace_s=hold_grace_s, previous=previous)
    send, receive = trio.open_memory_channel[Event](_EVENT_BUFFER)
    pipeline = SnapshotPipeline(SnapshotHolder(previous), reducer, send)
    mesh_key, bundle = f"{prefix}config/mesh", f"{prefix}{bundle_key}"
    intentions = f"{prefix}intentions/"

    async def watch_upstream(service: str) -> None:
        watch = pipeline.track(
            Watch(
                lambda i, w: consul.health_service(service, index=i, wait_s=w),
                name=f"health:{service}",
            )
        )
        ignored: frozenset[str] = frozenset()
        try:
            async for value in watch:
                endpoints = tuple(endpoint_of(i) for i in value if is_ip_address(i.address))
                named = frozenset(i.address for i in value if not is_ip_address(i.address))
                if named and named != ignored:
                    log_event(log, logging.WARNING, "endpoints_ignored", destination=service,
                              addresses=sorted(named)[:8], count=len(named),
                              reason="not an IP address: a mesh endpoint is an agent's address,"
                              " and resolving a name would stall every connection")  # fmt: skip
                ignored = named
                await send.send(EndpointsChanged(service, endpoints, watch.statistics().index))
        finally:
            pipeline.untrack(watch)

    fixed: list[tuple[Watch[Any], Callable[[Any], Event]]] = [
        (
            Watch(lambda i, w: consul.kv_get(mesh_key, index=i, wait_s=w), name=f"kv:{mesh_key}"),
            lambda v: MeshConfigChanged(_kv_value(v)),
        ),
        (
            Watch(lambda i, w: consul.kv_get(bundle, index=i, wait_s=w), name=f"kv:{bundle}"),
            lambda v: BundleChanged(_kv_value(v)),
        ),
        (
            Watch(
                lambda i, w: consul.kv_list(intentions, index=i, wait_s=w),
                name=f"kv:{intentions}",
            ),
            _documents(intentions),
        ),
    ]
    async with trio.open_nursery() as nursery:
        for watch, convert in fixed:
            nursery.start_soon(pump, pipeline.track(watch), convert, send)
        nursery.start_soon(
            functools.partial(
                pipeline.serve_reducer,
                receive,
                state_dir=state_dir,
                coalesce_s=coalesce_s,
                watch_upstream=watch_upstream,
            )
        )
        task_status.started(pipeline)
