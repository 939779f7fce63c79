"""A multi-host lab on one machine: network namespaces joined by a bridge, each with Consul.

Design note. Every "host" is a network namespace with one veth into a bridge that lives in
the root namespace. Addresses come from 198.18.0.0/24 (RFC 2544, benchmarking) and
2001:db8:6d::/64 (documentation prefix), so nothing here can be mistaken for, or routed to, a
real network; hosts get no default route. The root namespace holds 198.18.0.1 on the bridge so
the test process can talk to hosts directly.

One namespace runs a Consul server (``consul agent -dev``, fast leader election); every host
runs a Consul client agent joined to it, listening on its own loopback and on its address, as
on a real VM. Processes are started with ``ip netns exec`` (which execs, so the PID we hold
is the process itself) and are ended by that PID. Teardown removes exactly the namespaces and
the bridge this lab created.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

SUBNET_PREFIX = "198.18.0."
SUBNET6_PREFIX = "2001:db8:6d::"
ROOT_ADDRESS = SUBNET_PREFIX + "1"
CONSUL_SERVER_ADDRESS = SUBNET_PREFIX + "2"
STOP_GRACE_S = 5.0


def _run(argv: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), check=check, capture_output=True, text=True, timeout=30)


@dataclass
class Process:
    """A process the lab started; ended only through its PID."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, sig: int = signal.SIGTERM, grace_s: float = STOP_GRACE_S) -> int | None:
        """Send *sig*, wait up to *grace_s*, then SIGKILL. Returns the exit status."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.popen.pid, sig)
            try:
                self.popen.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.popen.pid, signal.SIGKILL)
                self.popen.wait(timeout=grace_s)
        return self.popen.returncode

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


@dataclass
class Host:
    """One namespace "host" of the lab."""

    lab: Lab
    name: str
    netns: str
    address: str
    address6: str
    processes: list[Process] = field(default_factory=list)

    def exec_argv(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *argv]

    def run(
        self, argv: Sequence[str], *, check: bool = True, timeout: float = 30, **kw: object
    ) -> subprocess.CompletedProcess[str]:
        """Run *argv* inside this host and wait for it."""
        return subprocess.run(  # type: ignore[call-overload, no-any-return]
            self.exec_argv(argv), check=check, capture_output=True, text=True, timeout=timeout, **kw
        )

    def spawn(
        self, name: str, argv: Sequence[str], *, env: dict[str, str] | None = None
    ) -> Process:
        """Start a long-running process inside this host; its output goes to a log file."""
        log_path = self.lab.workdir / f"{self.name}-{name}-{len(self.processes)}.log"
        log = log_path.open("wb")
        popen = subprocess.Popen(
            self.exec_argv(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        log.close()
        proc = Process(name, popen, log_path)
        self.processes.append(proc)
        return proc

    @property
    def consul_http(self) -> str:
        """This host's Consul client agent, as reached from the root namespace."""
        return f"http://{self.address}:8500"


class Lab:
    """A Consul server namespace and *n* host namespaces on one bridge."""

    def __init__(self, tag: str, host_names: Sequence[str], workdir: Path) -> None:
        self.tag = tag
        self.workdir = workdir
        self.bridge = f"mbr{tag}"[:15]
        self.hosts: dict[str, Host] = {}
        self._namespaces: list[str] = []
        self._host_names = tuple(host_names)
        self.server: Host | None = None

    # -- building -----------------------------------------------------------------
    def start(self) -> None:
        _run(["ip", "link", "add", self.bridge, "type", "bridge"])
        _run(["ip", "addr", "add", f"{ROOT_ADDRESS}/24", "dev", self.bridge])
        _run(["ip", "link", "set", self.bridge, "up"])
        self.server = self._add_namespace("cs", CONSUL_SERVER_ADDRESS, 2)
        for i, name in enumerate(self._host_names):
            self.hosts[name] = self._add_namespace(name, f"{SUBNET_PREFIX}{10 + i}", 10 + i)
        self._start_consul_server()
        for host in self.hosts.values():
            self._start_consul_client(host)
        self.wait_members(len(self.hosts) + 1)

    def _add_namespace(self, name: str, address: str, index: int) -> Host:
        netns = f"meshd-{self.tag}-{name}"
        veth = f"mv{self.tag}{index}"[:15]
        _run(["ip", "netns", "add", netns])
        self._namespaces.append(netns)
        _run(["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns])
        _run(["ip", "link", "set", veth, "master", self.bridge, "up"])
        address6 = f"{SUBNET6_PREFIX}{index:x}"
        for argv in (
            ["ip", "link", "set", "lo", "up"],
            ["ip", "addr", "add", f"{address}/24", "dev", "eth0"],
            ["ip", "-6", "addr", "add", f"{address6}/64", "dev", "eth0", "nodad"],
            ["ip", "link", "set", "eth0", "up"],
        ):
            _run(["ip", "netns", "exec", netns, *argv])
        return Host(self, name, netns, address, address6)

    def _consul_argv(self, host: Host, extra: Sequence[str]) -> list[str]:
        data_dir = self.workdir / f"consul-{host.name}"
        data_dir.mkdir(exist_ok=True)
        return [
            "consul",
            "agent",
            f"-node={host.name}",
            f"-bind={host.address}",
            f"-client=127.0.0.1 {host.address}",
            f"-data-dir={data_dir}",
            "-dns-port=-1",
            "-log-level=warn",
            *extra,
        ]

    def _start_consul_server(self) -> None:
        assert self.server is not None
        argv = self._consul_argv(self.server, ["-dev"])
        # -dev ignores -data-dir; keep argv uniform anyway (it is harmless).
        self.server.spawn("consul", [a for a in argv if not a.startswith("-data-dir")])
        self.wait_http(self.server, leader=True)

    def _start_consul_client(self, host: Host) -> None:
        host.spawn("consul", self._consul_argv(host, [f"-retry-join={CONSUL_SERVER_ADDRESS}"]))

    def restart_consul(self, host: Host) -> Process:
        """Start a Consul agent again on *host* (after the test stopped it)."""
        if host is self.server:
            argv = [a for a in self._consul_argv(host, ["-dev"]) if not a.startswith("-data-dir")]
            proc = host.spawn("consul", argv)
            self.wait_http(host, leader=True)
        else:
            proc = host.spawn(
                "consul", self._consul_argv(host, [f"-retry-join={CONSUL_SERVER_ADDRESS}"])
            )
        return proc

    # -- waiting ------------------------------------------------------------------
    def wait_http(self, host: Host, *, leader: bool = False, timeout_s: float = 30.0) -> None:
        """Wait until *host*'s Consul answers (and, with *leader*, knows a leader)."""
        deadline = time.monotonic() + timeout_s
        last: object = None
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{host.consul_http}/v1/status/leader", timeout=2) as r:
                    body = json.loads(r.read())
                if not leader or body:
                    return
            except OSError as exc:
                last = exc
            time.sleep(0.1)
        raise TimeoutError(f"Consul on {host.name} not ready in {timeout_s}s: {last}")

    def wait_members(self, count: int, *, timeout_s: float = 30.0) -> None:
        """Wait until the server sees *count* alive members."""
        assert self.server is not None
        deadline = time.monotonic() + timeout_s
        alive = 0
        while time.monotonic() < deadline:
            with urllib.request.urlopen(f"{self.server.consul_http}/v1/agent/members") as r:
                members = json.loads(r.read())
            alive = sum(1 for m in members if m.get("Status") == 1)
            if alive >= count:
                for host in self.hosts.values():
                    self.wait_http(host, leader=True)
                return
            time.sleep(0.1)
        raise TimeoutError(f"only {alive} of {count} Consul members alive after {timeout_s}s")

    # -- teardown -----------------------------------------------------------------
    def close(self) -> None:
        hosts = list(self.hosts.values()) + ([self.server] if self.server else [])
        for host in hosts:
            for proc in reversed(host.processes):
                proc.stop()
        for netns in reversed(self._namespaces):
            _run(["ip", "netns", "del", netns], check=False)
        _run(["ip", "link", "del", self.bridge], check=False)


def _sweep_stale(tag: str) -> None:
    """Remove namespaces and the bridge a crashed earlier run of this same lab tag left."""
    listing = _run(["ip", "netns", "list"], check=False).stdout
    for line in listing.splitlines():
        name = line.split()[0] if line.strip() else ""
        if name.startswith(f"meshd-{tag}-"):
            _run(["ip", "netns", "del", name], check=False)
    _run(["ip", "link", "del", f"mbr{tag}"[:15]], check=False)


def require_root_netns() -> None:
    """Fail (not skip) when the lab cannot run: CI runs as root and must run these tests."""
    if os.geteuid() != 0:
        pytest.fail("the network-namespace lab needs root (CI runs as root)")
    for tool in ("ip", "consul", "iptables-restore"):
        if shutil.which(tool) is None:
            pytest.fail(f"the network-namespace lab needs {tool!r}: run scripts/bootstrap.sh")


@contextlib.contextmanager
def open_lab(tag: str, host_names: Sequence[str]) -> Iterator[Lab]:
    """Build a lab named *tag* with the given hosts; tear it all down afterwards."""
    require_root_netns()
    _sweep_stale(tag)
    workdir = Path(tempfile.mkdtemp(prefix=f"meshd-lab-{tag}-"))
    lab = Lab(tag, host_names, workdir)
    try:
        lab.start()
        yield lab
    finally:
        lab.close()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    """A three-host lab (web, api, db) shared by one test module."""
    with open_lab("t", ("web", "api", "db")) as the_lab:
        yield the_lab
