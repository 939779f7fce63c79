"""A multi-host lab on one machine: network namespaces joined by a bridge, each with Consul.

Design note. Every "host" is a network namespace with one veth into a bridge that lives in
the root namespace. Addresses come from 198.18.<n>.0/24 (RFC 2544, benchmarking; one /24 per
lab, so labs of concurrent runs never overlap) and 2001:db8:6d:<n>::/64 (documentation
prefix), so nothing here can be mistaken for, or routed to, a real network; hosts get no
default route. The root namespace holds 198.18.<n>.1 on the bridge so the test process can
talk to hosts directly. Names carry the creating process's PID, so a new run removes what a
crashed run left (its PID is gone) and never what a live one is using.

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
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from meshlab.devconsul import stop_process

# meshd-<tag>-<host> (namespace), mbr<tag> (bridge), mv<tag>x<index> (veth); tag = name+pid.
_NAME = re.compile(r"^(?:meshd-|mbr|mv)([a-z]+)(\d+)(?:-|x|$)")
# Set on every link a lab creates: the sweep removes no link of the machine's own, whatever
# its name.
_LINK_ALIAS = "meshd-lab"
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
        return stop_process(self.popen, grace_s=grace_s, sig=sig)

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

    def __init__(self, tag: str, host_names: Sequence[str], workdir: Path, subnet: int) -> None:
        self.tag = tag
        self.workdir = workdir
        self.prefix = f"198.18.{subnet}."
        self.prefix6 = f"2001:db8:6d:{subnet:x}::"
        self.root_address = self.prefix + "1"
        self.server_address = self.prefix + "2"
        self.bridge = f"mbr{tag}"[:15]
        self.hosts: dict[str, Host] = {}
        self._namespaces: list[str] = []
        self._host_names = tuple(host_names)
        self.server: Host | None = None

    # -- building -----------------------------------------------------------------
    def start(self) -> None:
        _run(["ip", "link", "add", self.bridge, "type", "bridge"])
        _run(["ip", "link", "set", "dev", self.bridge, "alias", _LINK_ALIAS])
        _run(["ip", "addr", "add", f"{self.root_address}/24", "dev", self.bridge])
        _run(["ip", "link", "set", self.bridge, "up"])
        self.server = self._add_namespace("cs", self.server_address, 2)
        for i, name in enumerate(self._host_names):
            self.hosts[name] = self._add_namespace(name, f"{self.prefix}{10 + i}", 10 + i)
        self._start_consul_server()
        for host in self.hosts.values():
            self._start_consul_client(host)
        self.wait_members(len(self.hosts) + 1)

    def _add_namespace(self, name: str, address: str, index: int) -> Host:
        netns = f"meshd-{self.tag}-{name}"
        veth = f"mv{self.tag}x{index}"
        if len(veth) > 15:
            raise LabUnavailable(f"interface name {veth!r} too long (pid too large?)")
        _run(["ip", "netns", "add", netns])
        self._namespaces.append(netns)
        _run(["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns])
        _run(["ip", "link", "set", "dev", veth, "alias", _LINK_ALIAS])
        _run(["ip", "link", "set", veth, "master", self.bridge, "up"])
        address6 = f"{self.prefix6}{index:x}"
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
        host.spawn("consul", self._consul_argv(host, [f"-retry-join={self.server_address}"]))

    def restart_consul(self, host: Host) -> Process:
        """Start a Consul agent again on *host* (after the test stopped it)."""
        if host is self.server:
            argv = [a for a in self._consul_argv(host, ["-dev"]) if not a.startswith("-data-dir")]
            proc = host.spawn("consul", argv)
            self.wait_http(host, leader=True)
        else:
            proc = host.spawn(
                "consul", self._consul_argv(host, [f"-retry-join={self.server_address}"])
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
            except urllib.error.HTTPError as exc:
                exc.close()  # it holds the response's socket
                last = f"HTTP {exc.code} {exc.reason}"
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


def _pid_alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def _sweep_stale() -> None:
    """Remove namespaces and links of labs whose creating process no longer exists."""
    names = [
        line.split()[0]
        for line in _run(["ip", "netns", "list"], check=False).stdout.splitlines()
        if line.strip()
    ]
    links = [  # "2: mbrf123: <...> ...\\    alias meshd-lab"
        line.split()[1].rstrip(":").split("@")[0]
        for line in _run(["ip", "-o", "link"], check=False).stdout.splitlines()
        if line.rstrip().endswith(f"alias {_LINK_ALIAS}")
    ]
    for name in names + links:
        match = _NAME.match(name)
        if match is None or _pid_alive(int(match.group(2))):
            continue
        if name.startswith("meshd-"):
            _run(["ip", "netns", "del", name], check=False)
        else:
            _run(["ip", "link", "del", name], check=False)


def _free_subnet() -> int:
    """A third octet n with 198.18.n.0/24 unused on this machine."""
    used = _run(["ip", "-4", "-br", "addr"], check=False).stdout
    for n in range(1, 255):
        if f"198.18.{n}." not in used:
            return n
    raise LabUnavailable("no free 198.18.n.0/24 left for another lab")


class LabUnavailable(RuntimeError):
    """The lab cannot run on this machine (not root, or a tool is missing)."""


def require_root_netns() -> None:
    """Raise :class:`LabUnavailable` when the lab cannot run (never a silent skip)."""
    if os.geteuid() != 0:
        raise LabUnavailable("the network-namespace lab needs root")
    for tool in ("ip", "consul", "iptables-restore"):
        if shutil.which(tool) is None:
            raise LabUnavailable(
                f"the network-namespace lab needs {tool!r}: run scripts/bootstrap.sh"
            )


@contextlib.contextmanager
def open_lab(name: str, host_names: Sequence[str]) -> Iterator[Lab]:
    """Build a lab (*name*: a few lowercase letters) with the given hosts; tear it down after."""
    require_root_netns()
    if not name.isalpha() or not name.islower() or len(name) > 3:
        raise ValueError(f"lab name {name!r}: 1-3 lowercase letters")
    _sweep_stale()
    tag = f"{name}{os.getpid()}"
    workdir = Path(tempfile.mkdtemp(prefix=f"meshd-lab-{tag}-"))
    lab = Lab(tag, host_names, workdir, _free_subnet())
    try:
        lab.start()
        yield lab
    finally:
        lab.close()
        shutil.rmtree(workdir, ignore_errors=True)
