"""Registration against a real Consul agent: services, the agent's TTL, sync, restarts."""

from __future__ import annotations

import json
import urllib.request
import uuid
from typing import Any

import pytest
import trio

from agent.registration import (
    AGENT_SERVICE,
    META_PROXY_PORT,
    Registrar,
    plan_sync,
    serve_registration,
    service_registration,
)
from meshd.config import CheckConfig, ServiceConfig
from meshd.consul import open_consul
from tests.plugins.consul_agent import ConsulAgentProcess

pytestmark = pytest.mark.consul


def agent_get(consul: ConsulAgentProcess, path: str) -> Any:
    request = urllib.request.Request(
        consul.http_address + path, headers={"X-Consul-Token": consul.token}
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read())


async def local_services(consul: ConsulAgentProcess) -> dict[str, Any]:
    return await trio.to_thread.run_sync(agent_get, consul, "/v1/agent/services")


async def local_checks(consul: ConsulAgentProcess) -> dict[str, Any]:
    return await trio.to_thread.run_sync(agent_get, consul, "/v1/agent/checks")


async def wait_until(predicate: Any, timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while not await predicate():
            await trio.sleep(0.05)


def svc(name: str, port: int, *checks: CheckConfig, **kw: Any) -> ServiceConfig:
    return ServiceConfig(name=name, port=port, checks=checks, **kw)


def test_plan_sync_diffs_by_id() -> None:
    a = service_registration(svc("a", 1000), inbound_port=15006)
    b = service_registration(svc("b", 1001), inbound_port=15006)
    b2 = service_registration(svc("b", 1002), inbound_port=15006)
    plan = plan_sync({"a": a, "b": b}, [b2, service_registration(svc("c", 3), inbound_port=1)])
    assert [r.effective_id for r in plan.register] == ["b", "c"]
    assert plan.deregister == ("a",)
    assert plan_sync({"a": a}, [a]).register == ()


def test_meshd_meta_wins_over_user_meta() -> None:
    from types import MappingProxyType

    reg = service_registration(
        svc("a", 1000, meta=MappingProxyType({"meshd-proxy-port": "1", "team": "x"})),
        inbound_port=15006,
    )
    assert reg.meta[META_PROXY_PORT] == "15006" and reg.meta["team"] == "x"


async def test_services_and_agent_registered_with_checks(
    consul_agent: ConsulAgentProcess,
) -> None:
    uid = uuid.uuid4().hex[:8]
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    web = svc(
        f"web-{uid}",
        port,
        CheckConfig(kind="tcp", interval=1.0, timeout=1.0),
        CheckConfig(kind="http", path="/health", interval=30.0, timeout=1.0),
        CheckConfig(kind="ttl", ttl=1.5),
        tags=("blue",),
    )
    async with open_consul(consul_agent.settings()) as consul, trio.open_nursery() as nursery:
        registrar: Registrar = await nursery.start(
            lambda task_status: serve_registration(
                consul,
                [web],
                agent_service_id=f"agent-{uid}",
                metrics_port=15020,
                ttl_s=1.5,
                task_status=task_status,
            )
        )
        services = await local_services(consul_agent)
        assert services[web.id]["Tags"] == ["blue"]
        assert services[web.id]["Meta"]["meshd"] and services[web.id]["Meta"][META_PROXY_PORT]
        agent = services[f"agent-{uid}"]
        assert agent["Service"] == AGENT_SERVICE and agent["Meta"]["meshd-metrics-port"] == "15020"
        checks = await local_checks(consul_agent)
        mine = {c["Type"] for c in checks.values() if c["ServiceID"] == web.id}
        assert mine == {"tcp", "http", "ttl"}

        async def tcp_check_passing() -> bool:
            statuses = await local_checks(consul_agent)
            return any(
                c["ServiceID"] == web.id and c["Type"] == "tcp" and c["Status"] == "passing"
                for c in statuses.values()
            )

        await wait_until(tcp_check_passing)  # Consul reaches the real listener
        # The agent's TTL (1.5 s) stays passing across several TTL periods.
        for _ in range(4):
            await trio.sleep(1.0)
            statuses = await local_checks(consul_agent)
            assert statuses[f"agent-{uid}:ttl"]["Status"] == "passing"
            assert statuses[f"{web.id}:ttl:2"]["Status"] == "passing"  # services' TTLs too
        assert registrar.statistics().ttl_passes >= 6
        await registrar.deregister_all()
        services = await local_services(consul_agent)
        assert web.id not in services and f"agent-{uid}" not in services
        nursery.cancel_scope.cancel()
    listener.socket.close()


async def test_removed_service_deregistered_and_restored_behind_our_back(
    consul_agent: ConsulAgentProcess,
) -> None:
    uid = uuid.uuid4().hex[:8]
    a, b = svc(f"a-{uid}", 20001), svc(f"b-{uid}", 20002)
    async with open_consul(consul_agent.settings()) as consul, trio.open_nursery() as nursery:
        registrar: Registrar = await nursery.start(
            lambda task_status: serve_registration(
                consul,
                [a, b],
                agent_service_id=f"agent-{uid}",
                metrics_port=15020,
                anti_entropy_s=0.5,
                task_status=task_status,
            )
        )
        assert {a.id, b.id} <= set(await local_services(consul_agent))
        assert await registrar.sync([a])  # b's file was removed
        assert b.id not in await local_services(consul_agent)
        await consul.service_deregister(a.id)  # an operator removes it behind our back

        async def a_back() -> bool:
            return a.id in await local_services(consul_agent)

        await wait_until(a_back, timeout=5)
        assert b.id not in await local_services(consul_agent)  # removed stays removed
        await registrar.deregister_all()
        await trio.sleep(1.2)  # anti-entropy must not bring anything back after draining
        assert a.id not in await local_services(consul_agent)
        nursery.cancel_scope.cancel()


async def test_reregisters_after_consul_restart(
    private_consul_agent: ConsulAgentProcess,
) -> None:
    web = svc("web", 20003)
    async with (
        open_consul(private_consul_agent.settings()) as consul,
        trio.open_nursery() as nursery,
    ):
        registrar: Registrar = await nursery.start(
            lambda task_status: serve_registration(
                consul,
                [web],
                agent_service_id="agent-1",
                metrics_port=15020,
                ttl_s=1.5,
                anti_entropy_s=3600,  # only the TTL failure may restore it
                task_status=task_status,
            )
        )
        assert registrar.statistics().full_passes == 0
        # Dev mode keeps state in memory: the restarted agent has forgotten everything.
        await trio.to_thread.run_sync(private_consul_agent.restart)

        async def restored() -> bool:
            services = await local_services(private_consul_agent)
            checks = await local_checks(private_consul_agent)
            ttl = checks.get("agent-1:ttl", {}).get("Status")
            return {"web", "agent-1"} <= set(services) and ttl == "passing"

        await wait_until(restored, timeout=10)
        stats = registrar.statistics()
        assert stats.errors >= 1 and stats.full_passes >= 1  # restored by the TTL path
        nursery.cancel_scope.cancel()


async def test_services_wait_for_services_ready_while_the_agent_registers_at_once(
    consul_agent: ConsulAgentProcess,
) -> None:
    # The agent gates its services on their certificates: until the gate opens, Consul
    # must not list them (no caller is sent to a proxy that cannot serve), the agent's own
    # registration and TTL go ahead regardless.
    uid = uuid.uuid4().hex[:8]
    web = svc(f"gated-{uid}", 9999)
    gate = trio.Event()
    async with open_consul(consul_agent.settings()) as consul, trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: serve_registration(
                consul,
                [web],
                agent_service_id=f"agent-{uid}",
                metrics_port=15020,
                ttl_s=0.6,
                services_ready=gate.wait,
                task_status=task_status,
            )
        )
        for _ in range(3):  # across several TTL periods
            services = await local_services(consul_agent)
            assert f"agent-{uid}" in services and web.id not in services
            checks = await local_checks(consul_agent)
            assert checks[f"agent-{uid}:ttl"]["Status"] == "passing"
            await trio.sleep(0.5)
        gate.set()

        async def registered() -> bool:
            return web.id in await local_services(consul_agent)

        await wait_until(registered)
        nursery.cancel_scope.cancel()
