"""The systems under test, each a pair of proxies behind one small launcher interface.

A launcher starts one client-side and one server-side proxy in front of ``upstream`` and
returns where the load generator connects plus the PIDs whose CPU is charged to the system:

    class PairLauncher(Protocol):
        def start_pair(self, upstream: Addr) -> tuple[Addr, tuple[int, ...]]: ...

``meshd`` is :class:`AgentPair`: the agent's own proxy handlers, each side its own
process (``bench.agent_pair``). ``meshd-w2`` is the same with ``[proxy] workers = 2``: two
processes per side accepting from one listening socket, as the agent's workers do.
``meshd-naive`` is the trio.SSLStream baseline the issue started from
(``bench.meshd_pair naive``). Processes must be started with ``env.procs.start`` so that
they are ended on every exit path.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from bench.procs import Processes, free_port
from bench.topology import HOST, SERVER_NAME, Pki

Addr = tuple[str, int]
REPO = Path(__file__).resolve().parent.parent
# Never through an HTTP proxy from the environment: every target is on loopback.
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class PairLauncher(Protocol):
    """Starts a client-side + server-side proxy pair; see the module docstring."""

    def start_pair(self, upstream: Addr) -> tuple[Addr, tuple[int, ...]]:
        """Start both proxies in front of ``upstream``; return (listen address, proxy PIDs)."""


@dataclass(frozen=True)
class Env:
    """What launchers may use: the process owner, the PKI and a scratch directory."""

    procs: Processes
    pki: Pki
    workdir: Path


def wait_http_ok(addr: Addr, *, timeout: float) -> None:
    """Wait until a GET through ``addr`` answers 200 (routing is up end to end)."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with _HTTP.open(f"http://{addr[0]}:{addr[1]}/", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError as exc:
            last = exc
        time.sleep(0.2)
    raise TimeoutError(f"no 200 through {addr[0]}:{addr[1]} after {timeout}s: {last}")


class Direct:
    """No proxy: the generator talks to nginx."""

    def __init__(self, env: Env) -> None:
        self.env = env

    def start_pair(self, upstream: Addr) -> tuple[Addr, tuple[int, ...]]:
        return upstream, ()


class TrioPair:
    """``bench.meshd_pair`` processes: ``fast`` (agent.pump/tlsconn) or ``naive`` (SSLStream)."""

    def __init__(self, env: Env, impl: str) -> None:
        self.env = env
        self.impl = impl

    def start_pair(self, upstream: Addr) -> tuple[Addr, tuple[int, ...]]:
        pki = self.env.pki
        inbound, outbound = (HOST, free_port()), (HOST, free_port())
        pids = []
        for role, listen, up, cert in (
            ("inbound", inbound, upstream, pki.server),
            ("outbound", outbound, inbound, pki.client),
        ):
            argv = [sys.executable, "-m", "bench.meshd_pair", self.impl, role,
                    "--listen", f"{listen[0]}:{listen[1]}", "--upstream", f"{up[0]}:{up[1]}",
                    "--ca", str(pki.ca), "--cert", str(cert)]  # fmt: skip
            child = self.env.procs.start(f"meshd-{self.impl}-{role}", argv, cwd=REPO,
                                         env={"PYTHONPATH": str(REPO)})  # fmt: skip
            self.env.procs.wait_listening(child, *listen, timeout=15)
            pids.append(child.pid)
        wait_http_ok(outbound, timeout=15)
        return outbound, tuple(pids)


class AgentPair:
    """``bench.agent_pair`` processes: the agent's own proxy handlers, as shipped.

    SPIFFE SVIDs from ``meshd.pki``, peer verification and intentions on every connection,
    the epoll pump engine, TLS resumption and warm connections (docs/adr/008, 010).

    ``workers`` > 1 is ``[proxy] workers``: the launcher opens each side's listening socket
    itself and starts that many processes per side, all accepting from it (``--listen-fd``;
    no SO_REUSEPORT), the way the agent passes its sockets to its worker processes.
    """

    def __init__(self, env: Env, variant: str = "warm", workers: int = 1) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, not {workers}")
        self.env = env
        self.variant = variant
        self.workers = workers

    def _certdir(self) -> Path:
        from bench.agent_pair import write_pki

        certdir = self.env.workdir / f"agent-pki-{self.variant}"
        if not certdir.exists():
            certdir.mkdir(mode=0o700)
            write_pki(certdir)
        return certdir

    def start_pair(self, upstream: Addr) -> tuple[Addr, tuple[int, ...]]:
        if self.workers > 1:
            return self._start_workers(upstream)
        certdir = self._certdir()
        inbound, outbound = (HOST, free_port()), (HOST, free_port())
        pids = []
        for role, listen, up in (("inbound", inbound, upstream), ("outbound", outbound, inbound)):
            argv = [sys.executable, "-m", "bench.agent_pair", role, self.variant,
                    str(listen[1]), str(up[1]), str(certdir)]  # fmt: skip
            child = self.env.procs.start(f"meshd-agent-{role}", argv, cwd=REPO,
                                         env={"PYTHONPATH": str(REPO)})  # fmt: skip
            self.env.procs.wait_listening(child, *listen, timeout=15)
            pids.append(child.pid)
        wait_http_ok(outbound, timeout=15)
        return outbound, tuple(pids)

    def _start_workers(self, upstream: Addr) -> tuple[Addr, tuple[int, ...]]:
        """``workers`` processes per side on one shared listening socket per side.

        PIDs are returned inbound processes first, then outbound (CPU is charged to all).
        """
        certdir = self._certdir()
        socks = {"inbound": _shared_listener(), "outbound": _shared_listener()}
        try:
            inbound, outbound = (socks[r].getsockname()[:2] for r in ("inbound", "outbound"))
            children = []
            for role, listen, up in (("inbound", inbound, upstream),
                                     ("outbound", outbound, inbound)):  # fmt: skip
                fd = socks[role].fileno()
                argv = [sys.executable, "-m", "bench.agent_pair", role, self.variant,
                        str(listen[1]), str(up[1]), str(certdir), f"--listen-fd={fd}"]  # fmt: skip
                env = {"PYTHONPATH": str(REPO)}
                for i in range(1, self.workers + 1):
                    name = f"meshd-w{self.workers}-{role}-{i}"
                    child = self.env.procs.start(name, argv, env=env, cwd=REPO, pass_fds=(fd,))
                    children.append(child)
        finally:
            for s in socks.values():  # the children hold their own copies
                s.close()
        # The sockets listen from the moment they are bound, so wait until every process
        # has entered its accept loop (else the first to get there takes every connection).
        for child in children:
            self.env.procs.wait_output(child, "accepting", timeout=15)
        wait_http_ok(outbound, timeout=15)
        return outbound, tuple(c.pid for c in children)


def _shared_listener() -> socket.socket:
    """A listening socket on a free loopback port, to be inherited by several processes."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((HOST, 0))
        sock.listen(4096)
    except OSError:
        sock.close()
        raise
    return sock


class HAProxyPair:
    """Two haproxy processes (default threads): TLS origination with a client cert, and
    a TLS listener that requires and verifies client certificates."""

    def __init__(self, env: Env) -> None:
        self.env = env

    def start_pair(self, upstream: Addr) -> tuple[Addr, tuple[int, ...]]:
        haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
        pki, d = self.env.pki, self.env.workdir / "haproxy"
        d.mkdir(parents=True, exist_ok=True)
        inbound, outbound = (HOST, free_port()), (HOST, free_port())
        common = (
            "global\n    maxconn 8000\n"
            "defaults\n    mode tcp\n    timeout connect 5s\n"
            "    timeout client 300s\n    timeout server 300s\n"
        )
        confs = {
            "inbound": common
            + f"frontend fin\n    bind {inbound[0]}:{inbound[1]} ssl crt {pki.server}"
            f" ca-file {pki.ca} verify required\n    default_backend up\n"
            f"backend up\n    server nginx {upstream[0]}:{upstream[1]}\n",
            "outbound": common
            + f"frontend fout\n    bind {outbound[0]}:{outbound[1]}\n    default_backend mesh\n"
            f"backend mesh\n    server in {inbound[0]}:{inbound[1]} ssl crt {pki.client}"
            f" ca-file {pki.ca} verify required sni str({SERVER_NAME})"
            f" verifyhost {SERVER_NAME}\n",
        }
        pids = []
        for role, listen in (("inbound", inbound), ("outbound", outbound)):
            conf = d / f"{role}.cfg"
            conf.write_text(confs[role])
            child = self.env.procs.start(f"haproxy-{role}", [haproxy, "-db", "-f", str(conf)])
            self.env.procs.wait_listening(child, *listen, timeout=15)
            pids.append(child.pid)
        wait_http_ok(outbound, timeout=15)
        return outbound, tuple(pids)


class ConsulPair:
    """``consul agent -dev`` (Connect CA built in), two services with sidecar registrations,
    an allow intention, and ``consul connect proxy -sidecar-for`` for each side."""

    def __init__(self, env: Env) -> None:
        self.env = env

    def start_pair(self, upstream: Addr) -> tuple[Addr, tuple[int, ...]]:
        consul = shutil.which("consul") or "/usr/bin/consul"
        ports = {k: free_port() for k in ("http", "dns", "grpc", "serf-lan", "serf-wan", "server")}
        argv = [consul, "agent", "-dev", "-bind", HOST, "-client", HOST, "-node", "bench",
                "-log-level", "warn"] + [f"-{k}-port={v}" for k, v in ports.items()]  # fmt: skip
        agent = self.env.procs.start("consul-agent", argv)
        http = f"http://{HOST}:{ports['http']}"
        self._wait_leader(http, agent.pid)
        inbound, outbound = (HOST, free_port()), (HOST, free_port())
        check = [{"Name": "bench", "TTL": "87600h", "Status": "passing"}]
        bind = {"bind_address": HOST}
        self._put(http, "/v1/agent/service/register", {
            "Name": "bench-upstream", "ID": "bench-upstream", "Address": upstream[0],
            "Port": upstream[1], "Check": check[0],
            "Connect": {"SidecarService": {"Port": inbound[1], "Checks": check,
                                           "Proxy": {"Config": bind}}},
        })  # fmt: skip
        self._put(http, "/v1/agent/service/register", {
            "Name": "bench-client", "ID": "bench-client", "Address": HOST,
            "Port": free_port(), "Check": check[0],
            "Connect": {"SidecarService": {"Port": free_port(), "Checks": check, "Proxy": {
                "Config": bind,
                "Upstreams": [{"DestinationName": "bench-upstream",
                               "LocalBindAddress": outbound[0],
                               "LocalBindPort": outbound[1]}]}}},
        })  # fmt: skip
        env = {"CONSUL_HTTP_ADDR": f"{HOST}:{ports['http']}"}
        argv = [consul, "intention", "create", "-allow", "bench-client", "bench-upstream"]
        subprocess.run(argv, env={**os.environ, **env}, check=True, capture_output=True, timeout=30)
        pids = []
        for svc, listen in (("bench-upstream", inbound), ("bench-client", outbound)):
            child = self.env.procs.start(f"consul-proxy-{svc}",
                                         [consul, "connect", "proxy", "-sidecar-for", svc,
                                          "-log-level", "warn"], env=env)  # fmt: skip
            self.env.procs.wait_listening(child, *listen, timeout=30)
            pids.append(child.pid)
        wait_http_ok(outbound, timeout=60)
        return outbound, tuple(pids)

    @staticmethod
    def _wait_leader(http: str, pid: int) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with _HTTP.open(f"{http}/v1/status/leader", timeout=2) as r:
                    if json.loads(r.read()):
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"consul agent (pid {pid}) has no leader after 30s")

    @staticmethod
    def _put(http: str, path: str, body: object) -> None:
        req = urllib.request.Request(f"{http}{path}", data=json.dumps(body).encode(), method="PUT")
        with _HTTP.open(req, timeout=10) as r:
            r.read()


def launchers(env: Env) -> dict[str, PairLauncher]:
    """Every known system by name, in report order."""
    return {
        "direct": Direct(env),
        "consul": ConsulPair(env),
        "haproxy": HAProxyPair(env),
        "meshd": AgentPair(env),
        "meshd-w2": AgentPair(env, workers=2),
        "meshd-naive": TrioPair(env, "naive"),
    }


def available(name: str) -> str | None:
    """Why system ``name`` cannot run here, or None when it can."""
    if name == "haproxy" and not shutil.which("haproxy"):
        return "haproxy not installed"
    if name == "consul" and not shutil.which("consul"):
        return "consul not installed"
    if name in ("meshd", "meshd-w2"):
        try:
            for module in ("agent.outbound", "agent.inbound", "agent.epollpump"):
                importlib.import_module(module)
        except ImportError as exc:
            return f"agent fast path not importable: {exc}"
    return None
