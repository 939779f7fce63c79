"""``meshd-agent check``: the preflight against a real Consul agent of its own.

A host prepared as the Ansible role and ``meshctl`` would prepare it (CA published, a meshd
server registered and passing, agent.toml, a service file, a 0600 bootstrap token) checks
clean; then each thing an operator gets wrong is broken in turn and must be the one line
that fails, with exit 1.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import trio
from click.testing import CliRunner

from agent.main import agent_cli
from cli.main import meshctl
from meshd.consul import CheckDefinition, ServiceRegistration, open_consul
from meshd.keyfile import write_secret
from meshlab.devconsul import free_ports
from tests.plugins.consul_agent import ConsulAgentProcess

pytestmark = pytest.mark.consul


def prepare(agent: ConsulAgentProcess, root: Path) -> Path:
    """A host ready for ``meshd-agent run``; returns its agent.toml."""
    assert CliRunner().invoke(meshctl, ["ca", "init", "--dir", str(root / "ca")],
                              env=agent.env()).exit_code == 0  # fmt: skip
    trio.run(_register_server, agent)
    (root / "services.d").mkdir()
    (root / "services.d" / "web.toml").write_text('[service]\nname = "web"\nport = 8080\n')
    write_secret(root / "consul.token", agent.token.encode())
    write_secret(root / "bootstrap.token", b"mbt1.not-checked-here")
    outbound, inbound, admin, metrics = free_ports(4)
    config = root / "agent.toml"
    config.write_text(
        f'[agent]\nnode_name = "h1"\nstate_dir = "{root / "state"}"\n'
        f'services_dir = "{root / "services.d"}"\n'
        f'bootstrap_token_file = "{root / "bootstrap.token"}"\n'
        f'[consul]\naddress = "{agent.http_address}"\ntoken_file = "{root / "consul.token"}"\n'
        f'[proxy]\nuser = "{os.geteuid()}"\noutbound_port = {outbound}\n'
        f"inbound_port = {inbound}\nadmin_port = {admin}\nmetrics_port = {metrics}\n"
        'metrics_address = "127.0.0.1"\n'
    )
    return config


async def _register_server(agent: ConsulAgentProcess) -> None:
    check = CheckDefinition(kind="ttl", ttl_s=300, check_id="meshd-s1:ttl")
    async with open_consul(agent.settings()) as consul:
        await consul.service_register(
            ServiceRegistration(name="meshd", service_id="meshd-s1", port=8555, checks=(check,))
        )
        await consul.check_pass("meshd-s1:ttl")


def check(config: Path) -> tuple[int, dict[str, tuple[str, str]]]:
    result = CliRunner().invoke(agent_cli, ["check", "--config", str(config), "--format", "json"])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    lines = json.loads(result.stdout)
    return result.exit_code, {c["name"]: (c["status"], c["detail"]) for c in lines}


def test_a_prepared_host_checks_clean_and_each_mistake_is_named(
    private_consul_agent: ConsulAgentProcess, tmp_path: Path
) -> None:
    config = prepare(private_consul_agent, tmp_path)
    code, found = check(config)
    assert code == 0, found
    assert {s for s, _ in found.values()} == {"ok"}, found
    assert found["services"] == ("ok", "web") and found["meshd servers"][0] == "ok"

    # A bootstrap token others can read: refused, as the agent would refuse it.
    (tmp_path / "bootstrap.token").chmod(0o644)
    code, found = check(config)
    assert code == 1 and found["token"][0] == "FAIL"
    assert "mode 0644" in found["token"][1] and "no certificate yet for web" in found["token"][1]
    (tmp_path / "bootstrap.token").chmod(0o600)

    # A port already taken: a warning (the agent itself may be running), not a failure.
    config_text = config.read_text()
    admin_port = int(config_text.rsplit("admin_port = ", 1)[1].split()[0])
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", admin_port))
        code, found = check(config)
    assert code == 0 and found["admin port"][0] == "warn", found

    # Consul elsewhere: one line says where and why.
    config.write_text(config_text.replace(private_consul_agent.http_address, "http://127.0.0.1:9"))
    code, found = check(config)
    assert code == 1 and found["consul"][0] == "FAIL"
    assert "http://127.0.0.1:9" in found["consul"][1], found["consul"]

    # The agent to run as its own user (as the shipped unit runs it), checked by root (as
    # the Ansible role checks): a token of root's is one it could not read, a state
    # directory of root's one it could not write.
    uid = 64321
    config.write_text(config_text.replace(f'user = "{os.geteuid()}"', f'user = "{uid}"'))
    (tmp_path / "state").mkdir(mode=0o700)
    code, found = check(config)
    assert code == 1 and found["token"][0] == "FAIL", found
    assert f"belongs to uid {os.geteuid()}" in found["token"][1]
    assert f"proxy.user (uid {uid})" in found["token"][1]
    assert found["state dir"][0] == "warn" and "StateDirectory=" in found["state dir"][1]
    assert found["proxy user"][0] == "ok" and "must run as this user" in found["proxy user"][1]
    assert found["consul"][0] == "FAIL" and "token_file: " in found["consul"][1], found
    for owned in ("bootstrap.token", "state", "consul.token"):
        os.chown(tmp_path / owned, uid, uid)
    code, found = check(config)
    assert code == 0 and found["token"][0] == found["state dir"][0] == "ok", found

    # A service's user that does not exist here: named, as the agent would refuse it.
    config.write_text(config_text)
    web = tmp_path / "services.d" / "web.toml"
    web.write_text('[service]\nname = "web"\nport = 8080\nuser = "no-such-user-here"\n')
    code, found = check(config)
    assert code == 1 and found["service users"][0] == "FAIL", found
    assert "web.toml: service.user: no such user 'no-such-user-here'" in found["service users"][1]
    web.write_text('[service]\nname = "web"\nport = 8080\nuser = "4242"\n')
    code, found = check(config)
    assert code == 0 and found["service users"] == (
        "ok",
        "web as uid 4242: other users' connections get no identity",
    ), found

    # A misspelt key: the config line fails and nothing else is checked.
    config.write_text(config_text.replace("[proxy]\n", "[proxy]\nworker = 2\n"))
    code, found = check(config)
    assert code == 1 and list(found) == ["config"]
    assert "proxy.worker: unknown key (did you mean 'workers'?)" in found["config"][1]


def test_no_server_and_no_bundle_fail(
    private_consul_agent: ConsulAgentProcess, tmp_path: Path
) -> None:
    config = prepare(private_consul_agent, tmp_path)
    trio.run(_empty, private_consul_agent)
    code, found = check(config)
    assert code == 1
    assert found["meshd servers"][0] == "FAIL" and found["trust bundle"][0] == "FAIL", found


async def _empty(agent: ConsulAgentProcess) -> None:
    async with open_consul(agent.settings()) as consul:
        await consul.service_deregister("meshd-s1")
        await consul.kv_delete("meshd/", recurse=True)
