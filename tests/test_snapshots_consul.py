"""The snapshot pipeline against a real Consul agent."""

from __future__ import annotations

import os
import socket
import stat
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from prometheus_client import generate_latest

from agent.metrics import AgentMetrics
from agent.runtime import watch_totals
from agent.snapshots import SnapshotPipeline, serve_snapshots
from meshd.consul import (
    CheckDefinition,
    ConsulClient,
    ConsulSettings,
    ServiceRegistration,
    open_consul,
)
from meshd.consul.plan import Backoff
from meshd.consul.watch import Watch
from meshd.golden import parse_metrics
from meshd.snapshot import LocalService, Snapshot
from tests.plugins.consul_agent import ConsulAgentProcess

pytestmark = pytest.mark.consul


async def register(consul: ConsulClient, name: str, sid: str, address: str, port: int) -> None:
    check = CheckDefinition(kind="ttl", ttl_s=60, check_id=f"{sid}:ttl")
    await consul.service_register(
        ServiceRegistration(name=name, service_id=sid, address=address, port=port, checks=(check,))
    )
    await consul.check_pass(f"{sid}:ttl")


async def snapshot_where(
    pipeline: SnapshotPipeline, predicate: Callable[[Snapshot], object], timeout: float
) -> Snapshot:
    """The first published snapshot (current or later) satisfying *predicate*."""
    version = None
    with trio.fail_after(timeout):
        while True:
            snapshot = await pipeline.holder.wait_newer(version)
            if predicate(snapshot):
                return snapshot
            version = snapshot.version


async def test_endpoints_flow_into_snapshots_and_persist(
    consul_agent: ConsulAgentProcess, consul_kv_prefix: str, tmp_path: Path
) -> None:
    uid = uuid.uuid4().hex[:8]
    api, db = f"api-{uid}", f"db-{uid}"
    web = LocalService(f"web-{uid}", f"web-{uid}", 8080, upstreams=(api,))
    async with open_consul(consul_agent.settings()) as consul, trio.open_nursery() as nursery:
        await consul.kv_put(f"{consul_kv_prefix}config/mesh", b'{"mtls": "strict"}')
        pipeline: SnapshotPipeline = await nursery.start(
            lambda task_status: serve_snapshots(
                consul,
                prefix=consul_kv_prefix,
                local_services=(web,),
                state_dir=tmp_path,
                hold_grace_s=1.5,
                task_status=task_status,
            )
        )
        first = await snapshot_where(pipeline, lambda s: True, timeout=5)
        assert first.mesh_config_raw == b'{"mtls": "strict"}'
        assert first.endpoints(api) == () and first.trust_bundle_raw is None

        await register(consul, api, f"{api}-1", "198.18.0.2", 9001)
        await register(consul, api, f"{api}-2", "198.18.0.3", 9001)
        with trio.fail_after(1.0):  # within a second of registration
            both = await snapshot_where(pipeline, lambda s: len(s.endpoints(api)) == 2, 1.0)
        assert both.service_for("198.18.0.3", 9001) == api

        # On-demand discovery: the outbound proxy met db unmapped.
        await register(consul, db, f"{db}-1", "198.18.0.9", 5432)
        pipeline.request_upstream(db)
        with_db = await snapshot_where(pipeline, lambda s: s.service_for("198.18.0.9", 5432), 2)
        assert db in pipeline.statistics().upstream_watches
        assert with_db.endpoints(db)[0].service_id == f"{db}-1"

        # Every instance goes critical: the last good set is held, then dropped.
        await consul.check_fail(f"{api}-1:ttl")
        await consul.check_fail(f"{api}-2:ttl")
        failed_at = trio.current_time()
        emptied = await snapshot_where(pipeline, lambda s: not s.endpoints(api), timeout=5)
        assert trio.current_time() - failed_at >= 1.5
        assert pipeline.holder.current() is emptied
        for sid in (f"{api}-1", f"{api}-2", f"{db}-1"):
            await consul.service_deregister(sid)
        with trio.fail_after(5):
            while pipeline.statistics().persisted < pipeline.statistics().holder.published:
                await trio.sleep(0.02)
        last = pipeline.holder.current()
        nursery.cancel_scope.cancel()

    path = tmp_path / "snapshot.json"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600

    # Restart with Consul unreachable: the persisted snapshot is served at once.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    settings = ConsulSettings(address=f"http://127.0.0.1:{closed}", timeout_s=1.0)
    async with open_consul(settings) as dead, trio.open_nursery() as nursery:
        pipeline = await nursery.start(
            lambda task_status: serve_snapshots(
                dead,
                prefix=consul_kv_prefix,
                local_services=(web,),
                state_dir=tmp_path,
                task_status=task_status,
            )
        )
        assert pipeline.holder.current() == last
        await trio.sleep(0.5)
        assert pipeline.holder.current() == last  # nothing replaced it
        assert any(w.errors for w in pipeline.statistics().watches)

        # The agent's metrics say so: every watch failing, errors counted; the errors of a
        # watch that stops stay in the total.
        metrics = AgentMetrics()
        metrics.watch_consul(lambda: watch_totals(pipeline))
        page = parse_metrics(generate_latest(metrics.registry).decode())
        stats = pipeline.statistics()
        assert page[("meshd_consul_watches", ())] == len(stats.watches) >= 3
        assert page[("meshd_consul_watches_failing", ())] == len(stats.watches)
        assert page[("meshd_consul_watch_errors_total", ())] >= len(stats.watches)
        extra = pipeline.track(
            Watch(
                lambda i, w: dead.kv_get("extra", index=i, wait_s=w),
                name="kv:extra",
                backoff=Backoff(initial_s=0.01, max_s=0.02),
            )  # fmt: skip
        )
        async with trio.open_nursery() as inner:
            inner.start_soon(anext, extra)
            with trio.fail_after(5):
                while extra.statistics().errors < 3:
                    await trio.sleep(0.01)
            inner.cancel_scope.cancel()
        before = pipeline.statistics().watch_errors
        pipeline.untrack(extra)
        after = pipeline.statistics()
        assert "kv:extra" not in {w.name for w in after.watches}
        assert after.watch_errors >= before >= extra.statistics().errors >= 3
        nursery.cancel_scope.cancel()


async def test_an_endpoint_named_by_host_name_is_left_out_and_said_so(
    consul_agent: ConsulAgentProcess,
    consul_kv_prefix: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Consul takes a host name as a service address; dialling one would resolve it in the
    proxy's thread and stall every connection. A mesh endpoint is an agent's IP address:
    others are left out of the snapshot, with one warning naming them."""
    uid = uuid.uuid4().hex[:8]
    api = f"api-{uid}"
    web = LocalService(f"web-{uid}", f"web-{uid}", 8080, upstreams=(api,))
    async with open_consul(consul_agent.settings()) as consul, trio.open_nursery() as nursery:
        await register(consul, api, f"{api}-named", "api.example.internal", 9001)
        await register(consul, api, f"{api}-ip", "198.18.0.7", 9001)
        pipeline: SnapshotPipeline = await nursery.start(
            lambda task_status: serve_snapshots(
                consul, prefix=consul_kv_prefix, local_services=(web,), state_dir=tmp_path,
                task_status=task_status,
            )
        )  # fmt: skip
        found = await snapshot_where(pipeline, lambda s: len(s.endpoints(api)) > 0, timeout=5)
        assert [e.address for e in found.endpoints(api)] == ["198.18.0.7"]
        for sid in (f"{api}-named", f"{api}-ip"):
            await consul.service_deregister(sid)
        nursery.cancel_scope.cancel()
    warnings = [r.getMessage() for r in caplog.records if "endpoints_ignored" in r.getMessage()]
    assert len(warnings) == 1 and "api.example.internal" in warnings[0], warnings
