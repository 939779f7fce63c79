"""The multi-host lab itself: isolated hosts, a joined Consul cluster, a clean teardown."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from meshlab.netns import Host, Lab, open_lab

pytestmark = pytest.mark.netns

ECHO = str(Path(__file__).parent.parent / "meshlab" / "apps" / "echo.py")


def start_echo(host: Host, port: int, *, mode: str = "whoami") -> None:
    """Start the sample app on *host* and wait until it accepts connections."""
    proc = host.spawn(
        "echo", [sys.executable, ECHO, "--port", str(port), "--mode", mode, "--name", host.name]
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if "ready" in proc.log():
            return
        assert proc.alive(), proc.log()
        time.sleep(0.05)
    raise TimeoutError(f"echo app on {host.name} did not start: {proc.log()}")


def test_hosts_reach_each_other_but_have_no_default_route(lab: Lab) -> None:
    web, api = lab.hosts["web"], lab.hosts["api"]
    start_echo(api, 7001)
    script = (
        "import socket,sys;s=socket.create_connection((sys.argv[1],7001),timeout=5);"
        "print(s.recv(100).decode().strip())"
    )
    out = web.run([sys.executable, "-c", script, api.address]).stdout
    name, local_addr, local_port, peer = out.split()
    assert (name, local_addr, local_port) == ("api", api.address, "7001")
    assert peer.endswith(web.address)
    routes = web.run(["ip", "route", "show", "default"]).stdout
    assert routes.strip() == ""


def test_consul_cluster_spans_the_hosts(lab: Lab) -> None:
    api = lab.hosts["api"]
    registration = {"Name": "labcheck", "ID": "labcheck-1", "Port": 7001, "Address": api.address}
    req = urllib.request.Request(
        f"{api.consul_http}/v1/agent/service/register",
        data=json.dumps(registration).encode(),
        method="PUT",
    )
    urllib.request.urlopen(req, timeout=5).close()
    deadline = time.monotonic() + 10
    nodes: list[str] = []
    while time.monotonic() < deadline:
        url = f"{lab.hosts['web'].consul_http}/v1/health/service/labcheck"
        with urllib.request.urlopen(url, timeout=5) as r:
            nodes = [entry["Node"]["Node"] for entry in json.loads(r.read())]
        if nodes:
            break
        time.sleep(0.1)
    assert nodes == ["api"]


def test_teardown_leaves_nothing_behind() -> None:
    with open_lab("z", ("one",)) as small:
        pids = [p.pid for h in (*small.hosts.values(), small.server) if h for p in h.processes]
        namespaces = [h.netns for h in small.hosts.values()]
        bridge = small.bridge
        assert pids and all(Path(f"/proc/{pid}").exists() for pid in pids)
    listing = subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, check=False
    ).stdout
    assert not [ns for ns in namespaces if ns in listing]
    assert not any(Path(f"/proc/{pid}").exists() and _not_zombie(pid) for pid in pids)
    links = subprocess.run(
        ["ip", "link", "show", bridge], capture_output=True, text=True, check=False
    )
    assert links.returncode != 0


def test_the_stale_sweep_removes_only_links_a_lab_made() -> None:
    """The sweep of labs whose process died went by name alone: a machine's own macvlan
    or bridge called mvlan0 or mbridge0 matched the pattern (pid 0 never exists) and was
    deleted. Now only links carrying the lab's alias are candidates."""
    dead = 4_000_000  # above pid_max: no process has it
    ours, theirs = f"mbrzq{dead}", "mvlan0"
    for name in (ours, theirs):
        subprocess.run(["ip", "link", "del", name], capture_output=True, check=False)
        subprocess.run(["ip", "link", "add", name, "type", "bridge"], check=True)
    try:
        subprocess.run(["ip", "link", "set", "dev", ours, "alias", "meshd-lab"], check=True)
        with open_lab("z", ("one",)):  # sweeps first
            pass

        def exists(name: str) -> bool:
            show = ["ip", "link", "show", name]
            return subprocess.run(show, capture_output=True, check=False).returncode == 0

        assert not exists(ours)
        assert exists(theirs)
    finally:
        for name in (ours, theirs):
            subprocess.run(["ip", "link", "del", name], capture_output=True, check=False)


def _not_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_root_namespace_reaches_hosts_only_on_the_lab_subnet(lab: Lab) -> None:
    with socket.create_connection((lab.hosts["api"].address, 8500), timeout=5):
        pass
