"""Issue 4 end to end: unchanged apps on three namespace hosts, meshed by meshd-agent.

Every test here goes through real iptables interception, both proxies, real mTLS with
certificates issued by a running meshd server, and a real Consul cluster.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshlab.mesh import BIN, Mesh, as_user, exchange_argv, unit_capabilities
from meshlab.netns import Host
from tests.plugins.mesh import API_PORT, DB_PORT, WEB_AGENT_UID, WEB_PORT

pytestmark = [pytest.mark.netns, pytest.mark.consul]

MARKER = b"plaintext-marker-8d1f2c\n"


def call_until(
    mesh: Mesh,
    host: str,
    target: str,
    port: int,
    *,
    ok: bool,
    timeout_s: float = 10.0,
    payload: bytes = MARKER,
) -> subprocess.CompletedProcess[str]:
    """Call until the outcome is *ok* (a clean echo) or not, within *timeout_s*."""
    deadline = time.monotonic() + timeout_s
    while True:
        res = mesh.call(host, target, port, payload)
        succeeded = res.returncode == 0 and payload.decode() in res.stdout
        if succeeded == ok or time.monotonic() > deadline:
            return res
        time.sleep(0.1)


@contextlib.contextmanager
def capture(host: Host, path: Path, bpf: str) -> Iterator[Path]:
    """tcpdump on *host*'s link (eth0, inside its namespace) into *path* during the block."""
    log = path.with_suffix(".log")
    with log.open("wb") as err:
        # -Z root: write the file as root (tcpdump otherwise drops to its own user first);
        # --immediate-mode: deliver each packet at once, not when a ring block times out
        # (about a second), or a capture stopped soon after the traffic misses all of it.
        proc = subprocess.Popen(
            host.exec_argv(
                [
                    "tcpdump",
                    "-Z",
                    "root",
                    "--immediate-mode",
                    "-i",
                    "eth0",
                    "-U",
                    "-w",
                    str(path),
                    bpf,
                ]
            ),
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        deadline = time.monotonic() + 10
        while b"listening on" not in log.read_bytes():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        yield path
    finally:
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=10)
    assert b"packets captured" in log.read_bytes(), log.read_text()


def test_app_reaches_remote_service_through_both_proxies_and_only_tls_crosses(
    mesh: Mesh, tmp_path: Path
) -> None:
    mesh.meshctl("intention", "create", "web", "api", "--allow")
    api = mesh.lab.hosts["api"]
    with capture(mesh.lab.hosts["web"], tmp_path / "link.pcap", f"tcp port {API_PORT}") as pcap:
        res = call_until(mesh, "web", api.address, API_PORT, ok=True)
    assert res.returncode == 0, res.stderr
    name, *_ = res.stdout.split()
    assert name == "api"  # the unchanged api app answered ...
    assert MARKER.decode() in res.stdout  # ... and echoed our bytes back
    raw = pcap.read_bytes()
    assert len(raw) > 200, "the capture saw no traffic"
    assert MARKER.strip() not in raw  # nothing in clear text on the link
    assert b"\x17\x03\x03" in raw  # TLS application-data records crossed instead
    outbound = [r for r in mesh.events("web", "access") if r["direction"] == "outbound"]
    inbound = [r for r in mesh.events("api", "access") if r["direction"] == "inbound"]
    assert any(r["destination"] == "api" and r["outcome"] == "closed" for r in outbound)
    assert any(r["source"] == "web" and r["destination"] == "api" for r in inbound)


#: Linux capability numbers (linux/capability.h) of the ones the lab's agent may hold.
CAPABILITY_BITS = {"dac_read_search": 2, "net_bind_service": 10, "net_admin": 12, "net_raw": 13}


def test_the_agent_runs_as_its_own_user_and_root_is_meshed_like_any_app(mesh: Mesh) -> None:
    """web's agent runs as the shipped unit runs it (a uid of its own, the unit's ambient
    capabilities, no new privileges). Its rules exempt that uid alone: root's connections
    on web go through the mesh like an application's, and only the agent's user reaches a
    meshed port of another host unproxied (where the inbound proxy, expecting mTLS, turns
    it away)."""
    mesh.meshctl("intention", "create", "web", "api", "--allow", "--replace")
    web, api = mesh.hosts["web"], mesh.lab.hosts["api"]
    assert web.agent is not None and web.agent.alive()
    status = Path(f"/proc/{web.agent.pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines())
    assert fields["Uid"].split() == [str(WEB_AGENT_UID)] * 4, fields["Uid"]
    # The unit's capabilities and nothing more (dac_read_search: the lab's, to reach the
    # checkout); the agent installed its rules with them.
    ambient, _ = unit_capabilities()
    expected = sum(1 << CAPABILITY_BITS[c] for c in {*ambient, "dac_read_search"})
    assert int(fields["CapEff"], 16) == expected, fields["CapEff"]
    rules = web.host.run(["iptables-save", "-t", "nat"]).stdout
    assert f"--uid-owner {WEB_AGENT_UID} " in rules and "--uid-owner 0 " not in rules, rules

    assert call_until(mesh, "web", api.address, API_PORT, ok=True).returncode == 0
    before = len(mesh.events("web", "access"))
    as_root = web.host.run(exchange_argv(api.address, API_PORT, MARKER), check=False)
    assert as_root.returncode == 0 and as_root.stdout.startswith("api "), as_root
    assert MARKER.decode() in as_root.stdout
    deadline = time.monotonic() + 5
    while len(mesh.events("web", "access")) == before and time.monotonic() < deadline:
        time.sleep(0.05)  # the access line follows the connection's end
    assert len(mesh.events("web", "access")) > before  # web's outbound proxy carried it

    as_agent = as_user(WEB_AGENT_UID, exchange_argv(api.address, API_PORT, MARKER))
    bypassed = web.host.run(as_agent, check=False)
    assert MARKER.decode() not in bypassed.stdout, bypassed


def http_get(address: str, port: int, path: str) -> tuple[int, bytes]:
    """GET from the root namespace, as a Prometheus server elsewhere would."""
    conn = http.client.HTTPConnection(address, port, timeout=5)
    try:
        conn.request("GET", path)
        reply = conn.getresponse()
        return reply.status, reply.read()
    finally:
        conn.close()


def test_prometheus_elsewhere_finds_every_agent_in_consul_and_scrapes_only_metrics(
    mesh: Mesh,
) -> None:
    """``consul_sd_configs`` on ``meshd-agent``, done by hand from outside the hosts: each
    agent is registered with its metrics port, which serves ``/metrics`` on the host's
    address and nothing else; the admin endpoint is not reachable from there."""
    consul = mesh.consul_env()["CONSUL_HTTP_ADDR"].removeprefix("http://")
    host, port = consul.rsplit(":", 1)
    status, body = http_get(host, int(port), "/v1/catalog/service/meshd-agent")
    assert status == 200, body
    agents = {e["Node"]: e for e in json.loads(body)}
    assert set(agents) == {"web", "api", "db"}, sorted(agents)
    for node, entry in agents.items():
        address = entry["ServiceAddress"] or entry["Address"]
        assert address == mesh.lab.hosts[node].address
        assert (
            entry["ServicePort"] == 15020 and entry["ServiceMeta"]["meshd-metrics-port"] == "15020"
        )
        status, metrics = http_get(address, entry["ServicePort"], "/metrics")
        assert status == 200 and b"meshd_tcp_connections_total" in metrics, node
        for path in ("/snapshot", "/stats"):
            assert http_get(address, entry["ServicePort"], path)[0] == 404, (node, path)
        with pytest.raises(ConnectionRefusedError):
            http_get(address, 15000, "/snapshot")  # the admin endpoint: loopback only


def test_meshctl_proxy_snapshot_on_a_host_shows_what_its_agent_enforces(mesh: Mesh) -> None:
    web, api = mesh.hosts["web"].host, mesh.lab.hosts["api"]
    res = web.run([str(BIN / "meshctl"), "proxy", "snapshot"], check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.startswith("Snapshot: version ")
    assert "Mesh config: mTLS strict, default deny" in res.stdout  # no document: defaults
    assert "Trust bundle: " in res.stdout and "NONE" not in res.stdout
    local = res.stdout.split("Local services:\n", 1)[1].splitlines()[1].split()
    assert local == ["web", "web", str(WEB_PORT), "tcp", "-", "api"], res.stdout
    assert f"api      1          {api.address}:{API_PORT}" in res.stdout, res.stdout


def consul_put(mesh: Mesh, path: str, body: object = None, *, method: str = "PUT") -> None:
    host, port = mesh.lab.server_address, 8500
    conn = http.client.HTTPConnection(host, port, timeout=5)
    try:
        conn.request(method, path, body=None if body is None else json.dumps(body))
        reply = conn.getresponse()
        assert reply.status == 200, reply.read()
    finally:
        conn.close()


def test_meshctl_stat_adds_up_every_agents_counters_and_names_one_it_cannot_read(
    mesh: Mesh,
) -> None:
    """``meshctl stat`` from outside the hosts, while web calls api: api's calls in the
    window are counted (inbound at api, none failed), and an agent registered in Consul whose
    metrics port answers nothing is named, with exit 1."""
    mesh.meshctl("intention", "create", "web", "api", "--allow", "--replace")
    api = mesh.lab.hosts["api"]
    assert call_until(mesh, "web", api.address, API_PORT, ok=True).returncode == 0
    ghost = {"Name": "meshd-agent", "ID": "meshd-agent-ghost", "Port": 9,
             "Address": mesh.lab.root_address, "Meta": {"meshd-metrics-port": "9"}}  # fmt: skip
    consul_put(mesh, "/v1/agent/service/register", ghost)
    try:
        argv = [str(BIN / "meshctl"), "stat", "--window", "4", "--format", "json"]
        with subprocess.Popen(
            argv, env=mesh.consul_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        ) as proc:
            time.sleep(1.0)  # the first scrape
            calls = [mesh.call("web", api.address, API_PORT, MARKER) for _ in range(8)]
            out, err = proc.communicate(timeout=30)
    finally:
        consul_put(mesh, "/v1/agent/service/deregister/meshd-agent-ghost")
    assert all(c.returncode == 0 for c in calls), calls
    assert proc.returncode == 1, out + err
    found = json.loads(out)
    assert found["agents_scraped"] == 3, found
    (unreachable,) = found["agents_unreachable"]
    assert unreachable.startswith(f"{mesh.lab.root_address}:9: "), unreachable
    by_service = {s["service"]: s for s in found["services"]}
    assert by_service["api"]["connections"] >= 8 and by_service["api"]["success"] == 1.0, found
    assert by_service["api"]["bytes_in"] >= 8 * len(MARKER), found
    assert by_service["api"]["caller_failures"] == 0 and by_service["api"]["denied"] == 0


def check_ok(found: tuple[int, dict[str, list[dict[str, str]]]], host: str) -> bool:
    """Whether ``meshctl check`` found *host*'s agent healthy."""
    return [c["status"] for c in found[1][f"agent {host}"]] == ["ok"]


def test_meshctl_check_reads_every_agent_and_names_what_is_wrong(mesh: Mesh) -> None:
    """``meshctl check`` from outside the hosts: with all up, one ok line for the control
    plane and one per agent. db's intentions document made invalid: the mesh line names the
    document, and each agent that has taken it up says it fails closed on it; an agent Consul
    lists that answers nothing is named; both mended, clean again."""

    def check() -> tuple[int, dict[str, list[dict[str, str]]]]:
        res = mesh.meshctl("check", "--format", "json", check=False)
        assert res.returncode in (0, 1), res.stdout + res.stderr
        lines: dict[str, list[dict[str, str]]] = {}
        for line in json.loads(res.stdout):
            lines.setdefault(line["name"], []).append(line)
        return res.returncode, lines

    code, lines = check()
    assert code == 0, lines
    assert [c["status"] for c in lines["mesh"]] == ["ok"], lines
    for host in ("web", "api", "db"):
        (line,) = lines[f"agent {host}"]
        assert line["status"] == "ok" and "1 certificate(s)" in line["detail"], lines

    key = "/v1/kv/meshd/intentions/db"
    ghost = {"Name": "meshd-agent", "ID": "meshd-agent-ghost", "Port": 9,
             "Address": mesh.lab.root_address, "Meta": {"meshd-metrics-port": "9"}}  # fmt: skip
    consul_put(mesh, key, ["not", "an", "intentions", "document"])
    consul_put(mesh, "/v1/agent/service/register", ghost)
    try:
        deadline = time.monotonic() + 15
        while any(check_ok(found := check(), h) for h in ("web", "api", "db")):
            assert time.monotonic() < deadline, found
            time.sleep(0.5)
        code, lines = found
        assert code == 1
        for host in ("web", "api", "db"):
            (line,) = lines[f"agent {host}"]
            assert line["status"] == "FAIL", lines
            assert line["detail"].startswith("1 invalid intentions document(s) in force"), line
        assert any("intentions for db are invalid" in c["detail"] for c in lines["mesh"])
        (ghost_line,) = lines[f"agent {mesh.lab.server.name}"]
        assert ghost_line["status"] == "FAIL", lines
        assert ghost_line["detail"].startswith(f"metrics port {mesh.lab.root_address}:9: ")
    finally:
        consul_put(mesh, "/v1/agent/service/deregister/meshd-agent-ghost")
        consul_put(mesh, key, method="DELETE")
    deadline = time.monotonic() + 15
    while (found := check())[0] != 0:
        assert time.monotonic() < deadline, found
        time.sleep(0.5)


def test_a_call_straight_at_the_outbound_port_is_refused_once_not_looped(mesh: Mesh) -> None:
    """An app dials web's outbound proxy itself (loopback is never redirected): conntrack
    reports the proxy's own address as the original destination. Passed on under
    ``allow-any``, it used to reach the proxy again and again, until one connection had
    filled ``max_connections``. Now it is one refusal."""
    seen = len(mesh.events("web", "access"))
    res = mesh.call("web", "127.0.0.1", 15001, MARKER, timeout_s=3)
    assert res.returncode != 0 and MARKER.decode() not in res.stdout
    time.sleep(0.5)  # an access line is written just after its connection ends
    lines = mesh.events("web", "access")[seen:]
    assert [r["outcome"] for r in lines] == ["no_original_destination"], lines
    assert "addressed to the proxy itself" in str(lines[0]["reason"])


def test_without_an_intention_the_default_deny_refuses(mesh: Mesh) -> None:
    # api declares db as an upstream, so its proxy dials db over mTLS; db's inbound proxy
    # finds no intention and the mesh default is deny.
    db = mesh.lab.hosts["db"]
    res = call_until(mesh, "api", db.address, DB_PORT, ok=False, timeout_s=3)
    assert res.returncode != 0
    assert "db " not in res.stdout
    denied = [r for r in mesh.events("db", "access") if r["direction"] == "inbound"]
    refused = [r for r in denied if r["outcome"] == "refused" and "denied" in str(r["reason"])]
    # The line names the verified caller, and where it came from.
    assert refused and all(r["source"] == "api" for r in refused), denied
    assert all(str(r["client"]).startswith(f"{mesh.lab.hosts['api'].address}:") for r in refused)


def test_meshctl_status_sees_the_running_mesh_and_a_service_going_down(mesh: Mesh) -> None:
    """``meshctl status`` against the live lab: real agents' registrations, the running
    CA's bundle. No problem while all is up; db's application stopped (its Consul check
    fails) is named, with exit 1; back up, the status is clean again."""
    res = mesh.meshctl("status", "--format", "json", check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    found = json.loads(res.stdout)
    assert found["problems"] == []
    assert (found["agents"]["instances"], found["agents"]["passing"]) == (3, 3)
    assert found["servers"]["passing"] >= 1 and found["trust_domain"]
    meshed = {s["name"]: s for s in found["services"] if s["meshed"]}
    assert set(meshed) == {"web", "api", "db"}
    assert all(s["passing"] == s["instances"] == 1 for s in meshed.values())

    app = next(p for p in mesh.hosts["db"].apps if p.name == f"app{DB_PORT}")
    app.stop()
    mesh.hosts["db"].apps.remove(app)
    try:
        deadline = time.monotonic() + 15
        while (res := mesh.meshctl("status", check=False)).returncode == 0:
            assert time.monotonic() < deadline, res.stdout
            time.sleep(0.5)
        assert res.returncode == 1 and "no passing instance: db" in res.stdout, res.stdout
    finally:
        mesh.start_app("db", DB_PORT)
    mesh.wait_passing("db", 1)
    res = mesh.meshctl("status", check=False)
    assert res.returncode == 0 and "No problems found." in res.stdout, res.stdout
