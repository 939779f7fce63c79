"""``meshctl intention`` and ``meshctl config`` against a real Consul agent."""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from click.testing import CliRunner

from cli.intention_kv import IntentionConflictError, update_document
from cli.main import main, meshctl
from meshd.consul import ConsulSettings, open_consul
from meshd.errors import MeshdError
from meshd.intentions import Action, IntentionsDocument, SourceIntention, intentions_key
from tests.plugins.consul_agent import ConsulAgentProcess

pytestmark = pytest.mark.consul


class Run(NamedTuple):
    code: int
    out: str
    err: str  # stderr, or the one-line MeshdError message run_cli would print


@pytest.fixture
def cli(consul_agent: ConsulAgentProcess, consul_kv_prefix: str) -> Any:
    """Run ``meshctl`` in-process with the agent's environment and a unique prefix."""
    env = {**consul_agent.env(), "MESHD_KV_PREFIX": consul_kv_prefix}

    def run(*args: str, stdin: str | None = None) -> Run:
        result = CliRunner().invoke(meshctl, list(args), env=env, input=stdin)
        exc = result.exception
        if exc is not None and not isinstance(exc, SystemExit):
            if not isinstance(exc, MeshdError):
                raise exc
            return Run(result.exit_code, result.stdout, " ".join(str(exc).split()))
        return Run(result.exit_code, result.stdout, result.stderr)

    return run


def kv_get(agent: ConsulAgentProcess, key: str) -> bytes | None:
    request = urllib.request.Request(
        f"{agent.http_address}/v1/kv/{key}?raw=true", headers={"X-Consul-Token": agent.token}
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            data: bytes = response.read()
            return data
    except urllib.error.HTTPError as exc:
        exc.close()  # it holds the response's socket
        if exc.code == 404:
            return None
        raise


def test_create_get_list_check_match_delete(cli: Any) -> None:
    assert cli("intention", "create", "web", "api", "--allow", "--description", "fe").code == 0
    assert cli("intention", "create", "*", "api", "--deny").code == 0
    assert cli("intention", "create", "web", "*", "--deny").code == 0

    got = cli("intention", "get", "web", "api", "--format", "json")
    assert got.code == 0
    assert json.loads(got.out) == {
        "Destination": "api", "Precedence": 9, "Name": "web", "Action": "allow",
        "Description": "fe",
    }  # fmt: skip
    listed = json.loads(cli("intention", "list", "--format", "json").out)
    assert [(i["Name"], i["Destination"], i["Action"]) for i in listed["Intentions"]] == [
        ("web", "*", "deny"), ("web", "api", "allow"), ("*", "api", "deny"),
    ]  # fmt: skip
    assert listed["Invalid"] == []
    table = cli("intention", "list", "api").out.splitlines()
    assert table[0].split() == ["SOURCE", "DESTINATION", "ACTION", "PRECEDENCE", "DESCRIPTION"]
    assert table[1].split() == ["web", "api", "allow", "9", "fe"]

    allowed = cli("intention", "check", "web", "api")
    assert (allowed.code, allowed.out.splitlines()[0]) == (0, "Allowed")
    assert "intention: web -> api allow (precedence 9)" in allowed.out
    denied = cli("intention", "check", "db", "api")
    assert (denied.code, denied.out.splitlines()[0]) == (2, "Denied")
    assert "* -> api deny (precedence 8)" in denied.out
    assert cli("intention", "check", "web", "db").code == 2  # web -> * deny
    assert cli("intention", "check", "cache", "db").code == 2  # default deny

    steps = json.loads(cli("intention", "match", "api", "--format", "json").out)
    assert [(s["Name"], s["Destination"]) for s in steps["Steps"]] == [
        ("web", "api"), ("*", "api"), ("web", "*"),
    ]  # fmt: skip
    assert steps["DefaultAction"] == "deny"

    assert cli("intention", "delete", "web", "api").code == 0
    assert cli("intention", "check", "web", "api").code == 2  # now * -> api deny
    missing = cli("intention", "get", "web", "api")
    assert missing.code == 1 and "no intention web -> api" in missing.err


def test_deleting_the_last_source_deletes_the_key(
    cli: Any, consul_agent: ConsulAgentProcess, consul_kv_prefix: str
) -> None:
    cli("intention", "create", "web", "api", "--allow")
    key = intentions_key("api", consul_kv_prefix)
    assert kv_get(consul_agent, key) is not None
    assert cli("intention", "delete", "web", "api").code == 0
    assert kv_get(consul_agent, key) is None
    assert "no intention web -> api" in cli("intention", "delete", "web", "api").err


def test_create_refuses_to_overwrite_without_replace(cli: Any) -> None:
    cli("intention", "create", "web", "api", "--allow")
    again = cli("intention", "create", "web", "api", "--deny")
    assert again.code == 1
    assert "already exists (allow)" in again.err and "--replace" in again.err
    assert cli("intention", "check", "web", "api").code == 0
    assert cli("intention", "create", "web", "api", "--deny", "--replace").code == 0
    assert cli("intention", "check", "web", "api").code == 2


def test_bad_names_and_missing_action_are_one_line_errors(cli: Any) -> None:
    bad = cli("intention", "create", "Web", "api", "--allow")
    assert bad.code == 1 and "source 'Web' is not a service name" in bad.err
    assert cli("intention", "create", "web", "api").code == 2  # click usage error
    assert cli("intention", "create", "web", "api", "--allow", "--deny").code == 2
    assert cli("intention", "check", "*", "api").code == 1


def test_default_action_comes_from_mesh_config(cli: Any) -> None:
    assert cli("intention", "check", "web", "api").code == 2
    written = cli("config", "write", "mesh", "-", stdin='{"Kind":"mesh","Version":1,'
                  '"DefaultAction":"allow"}')  # fmt: skip
    assert written.code == 0, written.err
    assert cli("intention", "check", "web", "api").code == 0
    cli("intention", "create", "web", "api", "--deny")
    assert cli("intention", "check", "web", "api").code == 2


def test_invalid_document_is_flagged_and_denies(
    cli: Any, consul_agent: ConsulAgentProcess, consul_kv_prefix: str
) -> None:
    cli("config", "write", "mesh", "-", stdin='{"Kind":"mesh","Version":1,"DefaultAction":"allow"}')
    cli("intention", "create", "web", "db", "--allow")
    consul_agent.kv_put(intentions_key("api", consul_kv_prefix), b'{"Kind": "service-int')

    listed = json.loads(cli("intention", "list", "--format", "json").out)
    assert [i["Destination"] for i in listed["Invalid"]] == ["api"]
    assert "not valid JSON" in listed["Invalid"][0]["Error"]
    table = cli("intention", "list").out
    assert "INVALID api: denies every source" in table and "web" in table

    denied = cli("intention", "check", "web", "api")
    assert denied.code == 2 and "invalid" in denied.out  # default allow, yet denied
    assert cli("intention", "check", "web", "db").code == 0  # other destinations unaffected
    assert cli("intention", "check", "other", "cache").code == 0
    refused = cli("intention", "create", "web", "api", "--allow")
    assert refused.code == 1 and "consul kv delete" in refused.err


def test_invalid_mesh_config_fails_closed(
    cli: Any, consul_agent: ConsulAgentProcess, consul_kv_prefix: str
) -> None:
    key = f"{consul_kv_prefix}config/mesh"
    consul_agent.kv_put(key, b'{"Kind":"mesh","Version":1,"DefaultAction":"alow"}')
    check = cli("intention", "check", "web", "api")
    assert check.code == 2 and "DefaultAction" in check.err
    read = cli("config", "read", "mesh")
    assert read.code == 1 and "agents fail closed" in read.err


def test_config_read_write(cli: Any, tmp_path: Path) -> None:
    defaults = cli("config", "read", "mesh")
    assert defaults.code == 0 and "DefaultAction:     deny" in defaults.out
    assert "not set: defaults" in defaults.out

    path = tmp_path / "mesh.json"
    path.write_text('{"Kind":"mesh","Version":1,"MTLSMode":"permissive"}')
    assert cli("config", "write", "mesh", str(path)).code == 0
    stored = json.loads(cli("config", "read", "mesh", "--format", "json").out)
    assert stored["MTLSMode"] == "permissive" and stored["DefaultAction"] == "deny"

    path.write_text('{"Kind":"mesh","Version":1,"MTLSMode":"off"}')
    bad = cli("config", "write", "mesh", str(path))
    assert bad.code == 1 and "MTLSMode: must be 'strict' or 'permissive'" in bad.err
    assert str(path) in bad.err
    assert json.loads(cli("config", "read", "mesh", "--format", "json").out) == stored

    stale = cli("config", "write", "mesh", "-", "--cas", "1", stdin='{"Kind":"mesh","Version":1}')
    assert stale.code == 1 and "changed since ModifyIndex 1" in stale.err


async def test_update_reapplies_the_change_on_a_concurrent_write(
    consul_agent: ConsulAgentProcess, consul_settings: ConsulSettings, consul_kv_prefix: str
) -> None:
    key = intentions_key("api", consul_kv_prefix)
    calls: list[IntentionsDocument | None] = []
    other = json.dumps({"Kind": "service-intentions", "Name": "api", "Version": 1,
                        "Sources": [{"Name": "db", "Action": "deny"}]}).encode()  # fmt: skip

    def change(doc: IntentionsDocument | None) -> IntentionsDocument:
        calls.append(doc)
        if len(calls) == 1:  # another operator writes between our read and our CAS put
            consul_agent.kv_put(key, other)
        base = doc or IntentionsDocument(name="api")
        return base.with_source(SourceIntention(name="web", action=Action.ALLOW))

    async with open_consul(consul_settings) as consul:
        result = await update_document(consul, key, "api", change)
    assert calls[0] is None and calls[1] is not None
    assert result is not None and [s.name for s in result.sources] == ["db", "web"]
    stored = json.loads(kv_get(consul_agent, key) or b"")
    assert [s["Name"] for s in stored["Sources"]] == ["db", "web"]


async def test_update_gives_up_without_overwriting(
    consul_agent: ConsulAgentProcess, consul_settings: ConsulSettings, consul_kv_prefix: str
) -> None:
    key = intentions_key("api", consul_kv_prefix)
    writes = 0

    def change(doc: IntentionsDocument | None) -> IntentionsDocument:
        nonlocal writes
        writes += 1
        body = {"Kind": "service-intentions", "Name": "api", "Version": 1,
                "Sources": [{"Name": f"s{writes}", "Action": "deny"}]}  # fmt: skip
        consul_agent.kv_put(key, json.dumps(body).encode())
        return IntentionsDocument(name="api").with_source(SourceIntention("web", Action.ALLOW))

    async with open_consul(consul_settings) as consul:
        with pytest.raises(IntentionConflictError, match="nothing was written"):
            await update_document(consul, key, "api", change)
    stored = json.loads(kv_get(consul_agent, key) or b"")
    assert [s["Name"] for s in stored["Sources"]] == [f"s{writes}"]


@pytest.mark.parametrize(
    ("args", "code", "stream", "start"),
    [
        (["intention", "check", "web", "api"], 2, "out", "Denied\n"),
        (["intention", "create", "web", "API", "--allow"], 1, "err",
         "meshctl: error: destination 'API' is not a service name"),
    ],
)  # fmt: skip
def test_run_cli_exit_codes(
    consul_agent: ConsulAgentProcess,
    consul_kv_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    code: int,
    stream: str,
    start: str,
) -> None:
    """Through the console script's run_cli: exit 2 for denied, one-line errors exit 1."""
    for name, value in {**consul_agent.env(), "MESHD_KV_PREFIX": consul_kv_prefix}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(sys, "argv", ["meshctl", *args])
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == code
    captured = capsys.readouterr()
    text = captured.out if stream == "out" else captured.err
    assert text.startswith(start)
    assert captured.err.count("\n") <= 1
