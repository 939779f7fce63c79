"""Driver of on-demand discovery: unknown original destinations -> upstream requests.

The outbound proxy calls :meth:`DestinationResolver.notify_unknown` (never blocks) for a
destination its snapshot cannot map. :func:`serve_discovery` dedupes through a
:class:`~meshd.snapshot.DestinationCache`, runs a few point lookups concurrently and
passes each service found to ``request_upstream`` (usually
:meth:`agent.snapshots.SnapshotPipeline.request_upstream`). See
docs/adr/004-bounded-upstream-set.md for why the lookup is by node and never a scan.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from meshd.consul import ConsulClient, ConsulError
from meshd.logevents import log_event
from meshd.snapshot import DestinationCache, DiscoveryStatistics, NodeService, match_destination

log = logging.getLogger("meshd.agent.discovery")

#: ``lookup(ip, port) -> service name or None``; raises ConsulError when Consul fails.
Lookup = Callable[[str, int], Awaitable[str | None]]


class DestinationResolver:
    """Turns unknown destinations into upstream requests; one per agent."""

    def __init__(
        self,
        lookup: Lookup,
        request_upstream: Callable[[str], None],
        *,
        negative_ttl_s: float = 30.0,
        queue: int = 256,
    ) -> None:
        """Create the resolver; nothing runs until :meth:`serve`."""
        self._lookup = lookup
        self._request_upstream = request_upstream
        self._cache = DestinationCache(negative_ttl_s=negative_ttl_s)
        self._send, self._receive = trio.open_memory_channel[tuple[str, int]](queue)
        self._dropped = 0

    def notify_unknown(self, address: str, port: int) -> None:
        """The proxy met ``address:port`` unmapped; never blocks (drops when saturated)."""
        try:
            self._send.send_nowait((address, port))
        except trio.WouldBlock:
            self._dropped += 1

    def statistics(self) -> DiscoveryStatistics:
        """Counters of lookups, hits, misses and suppressed duplicates."""
        return self._cache.statistics()

    async def serve(
        self, *, concurrency: int = 4, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Resolve notified destinations until cancelled, at most *concurrency* at once."""
        limiter = trio.Semaphore(concurrency)
        async with trio.open_nursery() as nursery:
            task_status.started()
            async for address, port in self._receive:
                if self._cache.begin(address, port, trio.current_time()):
                    await limiter.acquire()
                    nursery.start_soon(self._resolve, limiter, address, port)

    async def _resolve(self, limiter: trio.Semaphore, address: str, port: int) -> None:
        service: str | None = None
        try:
            service = await self._lookup(address, port)
        except ConsulError as exc:
            log_event(log, logging.WARNING, "discovery_failed", address=address, port=port,
                      error=str(exc))  # fmt: skip
        except Exception as exc:  # one destination's lookup must never end the agent
            log_event(log, logging.ERROR, "discovery_failed", address=address, port=port,
                      error=repr(exc)[:300])  # fmt: skip
        finally:
            self._cache.finish(address, port, service, trio.current_time())
            limiter.release()
        if service is not None:
            log_event(log, logging.INFO, "destination_discovered", address=address, port=port,
                      service=service)  # fmt: skip
            self._request_upstream(service)


async def serve_discovery(
    lookup: Lookup,
    request_upstream: Callable[[str], None],
    *,
    negative_ttl_s: float = 30.0,
    task_status: trio.TaskStatus[DestinationResolver] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a :class:`DestinationResolver` until cancelled; started with the resolver."""
    resolver = DestinationResolver(lookup, request_upstream, negative_ttl_s=negative_ttl_s)
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: resolver.serve(task_status=task_status))
        task_status.started(resolver)


def consul_lookup(consul: ConsulClient) -> Lookup:
    """A :data:`Lookup` by two point reads: the node at the address, then its services.

    Both are small reads scoped to one node (see ADR 004), never a scan of the catalog.
    A service registered with an explicit address on a node at another address is not
    found this way; declare it as an upstream instead.
    """

    async def lookup(address: str, port: int) -> str | None:
        _, nodes = await consul.catalog_nodes(address=address)
        found: list[NodeService] = []
        for node in nodes:
            try:
                services = await consul.catalog_node_services(node.node)
            except ValueError:
                continue  # a node name no request path can carry (check_name)
            for s in services:
                found.append(NodeService(s.service, s.address, s.port))
        return match_destination(found, address, port)

    return lookup
