"""``meshctl status`` and ``meshctl services`` against a real Consul agent of their own.

A private ``consul agent -dev`` per test, so the catalog holds exactly what the test puts in
it: registrations made the way the agent and the server make them (TTL checks that start
critical until passed), a CA published by ``meshctl ca init``, intentions written by
``meshctl intention``. The status must name each problem and exit 1, and exit 0 once they
are fixed.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from click.testing import CliRunner

from agent.registration import agent_registration, service_registration
from cli.main import meshctl
from meshd.config.service import parse_service_config
from meshd.consul import CheckDefinition, ServiceRegistration, open_consul
from meshd.consul.model import ServiceInstance
from meshd.intentions import intentions_key
from meshd.meshconfig import DEFAULTS, LoadedMeshConfig, MeshConfigError
from meshd.meshstatus import mesh_status
from tests.plugins.consul_agent import ConsulAgentProcess
from tests.plugins.pki import make_mesh_ca

pytestmark = pytest.mark.consul


def run(agent: ConsulAgentProcess, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(meshctl, list(args), env=agent.env())
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout


def meshed(name: str, port: int, *, ttl: bool = False) -> ServiceRegistration:
    check = '[[service.checks]]\nkind = "ttl"\nttl = "1m"\n' if ttl else ""
    config = parse_service_config(f'[service]\nname = "{name}"\nport = {port}\n{check}')
    return service_registration(config, inbound_port=15006)


async def register(agent: ConsulAgentProcess, *regs: ServiceRegistration) -> None:
    async with open_consul(agent.settings()) as consul:
        for reg in regs:
            await consul.service_register(reg)


async def check_pass(agent: ConsulAgentProcess, *check_ids: str) -> None:
    async with open_consul(agent.settings()) as consul:
        for check_id in check_ids:
            await consul.check_pass(check_id)


def server(name: str) -> ServiceRegistration:
    check = CheckDefinition(kind="ttl", ttl_s=60, check_id=f"meshd-{name}:ttl")
    return ServiceRegistration(
        name="meshd", service_id=f"meshd-{name}", port=8555, meta={"meshd": "0.1.0"},
        checks=(check,),
    )  # fmt: skip


def status_json(agent: ConsulAgentProcess) -> tuple[int, dict[str, Any]]:
    code, out = run(agent, "status", "--format", "json")
    return code, json.loads(out)


def test_status_names_each_problem_and_passes_once_they_are_fixed(
    private_consul_agent: ConsulAgentProcess, tmp_path: Path
) -> None:
    agent = private_consul_agent
    # An empty mesh: no server, no CA.
    code, found = status_json(agent)
    assert code == 1
    assert any("no meshd server is passing" in p for p in found["problems"]), found
    assert any("no usable trust bundle" in p for p in found["problems"]), found

    code, _ = run(agent, "ca", "init", "--dir", str(tmp_path / "ca"))
    assert code == 0
    web = meshed("web", 8080, ttl=True)
    db = meshed("db", 5432, ttl=True)  # its TTL check stays critical
    legacy = ServiceRegistration(name="legacy", service_id="legacy-1", port=7000)
    agents = [
        agent_registration(service_id=f"meshd-agent-h{n}", metrics_port=15020) for n in (1, 2)
    ]
    trio.run(register, agent, server("s1"), web, db, legacy, *agents)
    trio.run(check_pass, agent, "meshd-s1:ttl", "meshd-agent-h1:ttl", "web:ttl:0")
    code, out = run(agent, "intention", "create", "web", "db", "--allow")
    assert code == 0, out
    # An intentions document nobody could parse: the agents deny every connection to api.
    trio.run(_kv_put, agent, intentions_key("api"), b"{not json")

    code, found = status_json(agent)
    assert code == 1
    problems = found["problems"]
    assert any(p.startswith("1 of 2 agents not passing, on meshd-private") for p in problems)
    assert any("intentions for api are invalid" in p for p in problems), problems
    assert "meshed services with no passing instance: db" in problems, problems
    assert len(problems) == 3, problems
    assert found["servers"]["passing"] == 1 and found["trust_domain"].endswith(".consul")
    assert found["intentions"] == {"valid": 1, "invalid": ["api"]}
    by_name = {s["name"]: s for s in found["services"]}
    assert by_name["web"]["meshed"] == 1 and by_name["web"]["protocols"] == ["tcp"]
    assert by_name["legacy"]["meshed"] == 0 and by_name["db"]["critical"] == 1

    code, text = run(agent, "status")
    assert code == 1 and "Problems (3):" in text and "Agents:         1 of 2 passing" in text

    # Fixed: the second agent reports in, db's instance passes, api's document is removed.
    trio.run(check_pass, agent, "meshd-agent-h2:ttl", "db:ttl:0")
    trio.run(_kv_delete, agent, intentions_key("api"))
    code, text = run(agent, "status")
    assert code == 0, text
    assert "No problems found." in text and "Services:       2 meshed" in text


def test_services_lists_instances_by_health_and_what_is_meshed(
    private_consul_agent: ConsulAgentProcess,
) -> None:
    agent = private_consul_agent
    trio.run(register, agent, meshed("web", 8080), meshed("db", 5432, ttl=True))
    code, out = run(agent, "services")
    assert code == 0
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    assert out.splitlines()[0].split() == [
        "SERVICE", "INSTANCES", "PASSING", "WARNING", "CRITICAL", "MESHED", "PROTOCOL",
    ]  # fmt: skip
    assert rows["db"][1:] == ["1", "0", "0", "1", "1", "tcp"]
    assert rows["consul"][5:] == ["0", "-"]  # Consul's own service: not meshed
    code, out = run(agent, "services", "--format", "json")
    assert {s["name"] for s in json.loads(out)} >= {"web", "db", "consul"}


def test_a_root_near_its_end_and_an_invalid_mesh_config_are_problems() -> None:
    """The sans-IO summary on its own: values in, problems out."""
    ca = make_mesh_ca()
    root = ca.bundle.roots[0]
    now = root.cert.not_valid_after_utc - dt.timedelta(days=3, hours=1)
    server_up = ServiceInstance("n1", "10.0.0.1", "meshd-n1", "meshd", 8555)
    found = mesh_status(
        datacenter="dc1",
        leader="10.0.0.1:8300",
        instances={"meshd": (server_up,)},
        bundle=ca.bundle,
        bundle_error=None,
        mesh_config=LoadedMeshConfig(DEFAULTS, error=MeshConfigError("meshd/config/mesh: bad")),
        intentions={},
        now=now,
    )
    assert found.problems == (
        f"root {root.id[:16]} (active) expires in 3 days: rotate the CA (meshctl ca rotate)",
        "meshd/config/mesh: bad; agents fail closed (default deny, strict mTLS)",
    )


async def _kv_put(agent: ConsulAgentProcess, key: str, value: bytes) -> None:
    async with open_consul(agent.settings()) as consul:
        await consul.kv_put(key, value)


async def _kv_delete(agent: ConsulAgentProcess, key: str) -> None:
    async with open_consul(agent.settings()) as consul:
        await consul.kv_delete(key)


def _register_raw(agent: ConsulAgentProcess, body: dict[str, Any]) -> None:
    """Register as any Consul client may, past our own model's checks."""
    reply = httpx.put(f"{agent.http_address}/v1/agent/service/register", json=body,
                      headers={"X-Consul-Token": agent.token})  # fmt: skip
    assert reply.status_code == 200, reply.text


def test_odd_but_legal_service_names_are_read_or_reported(
    private_consul_agent: ConsulAgentProcess,
) -> None:
    """Consul accepts 'a/b' and 'a//b' as service names. The first is read as itself; the
    second no request path can address (Go's router would clean it into 'a/b'), so
    status names it as a problem and services leaves it out with a note, never a crash."""
    agent = private_consul_agent
    _register_raw(agent, {"Name": "a/b", "ID": "slash-1", "Port": 7001})
    _register_raw(agent, {"Name": "a?b", "ID": "query-1", "Port": 7002})
    result = CliRunner().invoke(meshctl, ["services", "--format", "json"], env=agent.env())
    assert result.exit_code == 0, (result.output, result.exception)
    by_name = {s["name"]: s for s in json.loads(result.stdout)}
    assert by_name["a/b"]["instances"] == 1 and by_name["a?b"]["instances"] == 1
    assert result.stderr == ""

    _register_raw(agent, {"Name": "a//b", "ID": "double-1", "Port": 7003})
    result = CliRunner().invoke(meshctl, ["services"], env=agent.env())
    assert result.exit_code == 0, (result.output, result.exception)
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()[1:]}
    assert rows["a/b"][1] == "1" and "a//b" not in rows  # not counted as a/b's either
    assert result.stderr.startswith("note: left out, service(s) 'a//b': Consul's HTTP API")
    assert result.stderr.count("\n") == 1
    code, found = status_json(agent)
    assert code == 1
    assert [p for p in found["problems"] if "'a//b'" in p] == [
        "service(s) 'a//b': Consul's HTTP API cannot address the name (an empty, '.' or '..'"
        " segment between '/'), so their health was not read; rename them"
    ]
    code, text = run(agent, "check")
    assert code == 1 and "FAIL  mesh" in text and "'a//b'" in text, text


@pytest.mark.parametrize(
    ("port", "reason"),
    [
        ("abc", "meta meshd-metrics-port 'abc' is not a port (1-65535)"),
        ("70000", "meta meshd-metrics-port '70000' is not a port (1-65535)"),
        ("abc:80", "Invalid port: 'abc:80'"),  # httpx.InvalidURL: not an httpx.HTTPError
    ],
)
def test_an_agent_registered_with_a_bad_metrics_port_is_a_failed_scrape(
    private_consul_agent: ConsulAgentProcess, port: str, reason: str
) -> None:
    agent = private_consul_agent
    registration = {"Name": "meshd-agent", "ID": "meshd-agent-h1", "Port": 15020,
                    "Address": "127.0.0.1", "Meta": {"meshd-metrics-port": port}}  # fmt: skip
    _register_raw(agent, registration)
    code, text = run(agent, "stat", "--window", "0.5")
    assert code == 1, text
    assert f"unreachable: 127.0.0.1:{port}: {reason} (its counts are missing above)" in text
    code, text = run(agent, "check", "--format", "json")
    assert code == 1
    assert {
        "name": "agent meshd-private",
        "status": "FAIL",
        "detail": f"metrics port 127.0.0.1:{port}: {reason}",
    } in json.loads(text), text
