"""On-demand discovery: the pure cache and matcher, and the resolver against real Consul."""

from __future__ import annotations

import json
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
import trio

from agent.discovery import DestinationResolver, serve_discovery
from agent.discovery import consul_lookup as agent_consul_lookup
from agent.snapshots import SnapshotPipeline, serve_snapshots
from meshd.consul import ServiceRegistration, open_consul
from meshd.snapshot import DestinationCache, LocalService, NodeService, match_destination
from tests.plugins.consul_agent import ConsulAgentProcess


def test_match_destination_unique_or_nothing() -> None:
    services = [
        NodeService("api", "10.0.0.1", 80),
        NodeService("db", "10.0.0.1", 5432),
        NodeService("db", "10.0.0.1", 5432),  # two instances of one service: still unique
        NodeService("a", "10.0.0.2", 80),
        NodeService("b", "10.0.0.2", 80),
    ]
    assert match_destination(services, "10.0.0.1", 5432) == "db"
    assert match_destination(services, "10.0.0.2", 80) is None  # ambiguous
    assert match_destination(services, "10.0.0.1", 81) is None


def test_cache_dedupes_in_flight_and_remembers_misses() -> None:
    cache = DestinationCache(negative_ttl_s=30.0)
    assert cache.begin("10.0.0.1", 80, now=0)
    assert not cache.begin("10.0.0.1", 80, now=1)  # one lookup in flight
    cache.finish("10.0.0.1", 80, None, now=2)
    assert not cache.begin("10.0.0.1", 80, now=31.9)  # miss remembered
    assert cache.begin("10.0.0.1", 80, now=32.0)  # and forgotten after the TTL
    cache.finish("10.0.0.1", 80, "api", now=33)
    assert cache.begin("10.0.0.1", 80, now=33)  # hits are not cached: the watch takes over
    stats = cache.statistics()
    assert (stats.lookups, stats.found, stats.not_found, stats.suppressed) == (3, 1, 1, 2)


def test_cache_bounds_remembered_misses() -> None:
    cache = DestinationCache(max_misses=2)
    for port in (1, 2, 3):
        cache.begin("x", port, 0)
        cache.finish("x", port, None, 0)
    assert cache.statistics().remembered_misses == 2
    assert cache.begin("x", 1, 0)  # the oldest miss was evicted


async def test_resolver_suppresses_repeats(autojump_clock: trio.abc.Clock) -> None:
    calls: list[tuple[str, int]] = []
    requested: list[str] = []

    async def lookup(address: str, port: int) -> str | None:
        calls.append((address, port))
        await trio.sleep(1)
        return "api" if port == 80 else None

    async with trio.open_nursery() as nursery:
        resolver: DestinationResolver = await nursery.start(
            serve_discovery, lookup, requested.append
        )
        for _ in range(5):
            resolver.notify_unknown("10.0.0.1", 80)
            resolver.notify_unknown("10.0.0.1", 443)
        await trio.sleep(2)
        for _ in range(5):
            resolver.notify_unknown("10.0.0.1", 443)  # remembered miss
        await trio.sleep(2)
        nursery.cancel_scope.cancel()
    assert sorted(calls) == [("10.0.0.1", 80), ("10.0.0.1", 443)]
    assert requested == ["api"]


async def test_a_lookup_that_fails_unexpectedly_is_a_miss_not_the_end_of_the_agent() -> None:
    """Fault injection: whatever one destination's lookup raises, the resolver (a task of
    the agent's nursery) goes on, and the destination counts as not found."""
    requested: list[str] = []

    async def lookup(address: str, port: int) -> str | None:
        if port == 1:
            raise ValueError("node name 'a/../b': has a '..' segment")
        return "api"

    async with trio.open_nursery() as nursery:
        resolver: DestinationResolver = await nursery.start(
            serve_discovery, lookup, requested.append
        )
        resolver.notify_unknown("10.0.0.1", 1)
        await trio.sleep(0.1)
        resolver.notify_unknown("10.0.0.1", 80)
        await trio.sleep(0.1)
        nursery.cancel_scope.cancel()
    assert requested == ["api"]
    assert resolver.statistics().not_found == 1


@pytest.mark.consul
async def test_a_node_name_no_request_can_carry_is_skipped(
    consul_agent: ConsulAgentProcess,
) -> None:
    """Consul takes any node name in a catalog registration's body; one with a '..'
    segment cannot be read back by name. The agent's lookup skips it."""
    address = f"10.77.{uuid.uuid4().int % 250}.9"
    body = {"Node": "rack1/../db", "Address": address,
            "Service": {"Service": "odd-db", "Port": 5432}}  # fmt: skip

    def put(path: str, payload: object) -> None:
        request = urllib.request.Request(
            consul_agent.http_address + path, data=json.dumps(payload).encode(), method="PUT",
            headers={"X-Consul-Token": consul_agent.token},
        )  # fmt: skip
        with urllib.request.urlopen(request, timeout=5) as response:
            assert response.status == 200

    put("/v1/catalog/register", body)
    try:
        async with open_consul(consul_agent.settings()) as consul:
            assert await agent_consul_lookup(consul)(address, 5432) is None
    finally:
        put("/v1/catalog/deregister", {"Node": body["Node"]})


def consul_lookup(agent: ConsulAgentProcess) -> Any:
    """The node-scoped point lookup of ADR 004 over Consul's HTTP API."""

    def get(path: str) -> Any:
        request = urllib.request.Request(
            agent.http_address + path, headers={"X-Consul-Token": agent.token}
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read())

    def lookup_sync(address: str, port: int) -> str | None:
        query = urllib.parse.urlencode({"filter": f'Address == "{address}"'})
        services = []
        for node in get(f"/v1/catalog/nodes?{query}"):
            found = get(f"/v1/catalog/node-services/{node['Node']}")
            services += [
                NodeService(s["Service"], s["Address"] or node["Address"], s["Port"])
                for s in found["Services"]
            ]
        return match_destination(services, address, port)

    async def lookup(address: str, port: int) -> str | None:
        return await trio.to_thread.run_sync(lookup_sync, address, port)

    return lookup


@pytest.mark.consul
async def test_unknown_destination_becomes_watched_upstream(
    consul_agent: ConsulAgentProcess, consul_kv_prefix: str, tmp_path: Path
) -> None:
    uid = uuid.uuid4().hex[:8]
    db = f"db-{uid}"
    web = LocalService(f"web-{uid}", f"web-{uid}", 8080)
    async with open_consul(consul_agent.settings()) as consul, trio.open_nursery() as nursery:
        await consul.service_register(ServiceRegistration(name=db, service_id=db, port=25432))
        pipeline: SnapshotPipeline = await nursery.start(
            lambda task_status: serve_snapshots(
                consul,
                prefix=consul_kv_prefix,
                local_services=(web,),
                state_dir=None,
                task_status=task_status,
            )
        )
        resolver: DestinationResolver = await nursery.start(
            serve_discovery, consul_lookup(consul_agent), pipeline.request_upstream
        )
        first = await pipeline.holder.wait_newer(None)
        assert first.service_for("127.0.0.1", 25432) is None
        resolver.notify_unknown("127.0.0.1", 25432)  # the node's address, the service port
        resolver.notify_unknown("127.0.0.1", 1)  # nothing there
        with trio.fail_after(5):
            snapshot = first
            while snapshot.service_for("127.0.0.1", 25432) != db:
                snapshot = await pipeline.holder.wait_newer(snapshot.version)
        assert pipeline.statistics().upstream_watches == frozenset({db})
        assert resolver.statistics().not_found == 1
        await consul.service_deregister(db)
        nursery.cancel_scope.cancel()
