"""A whole mesh in the lab: the CA, a meshd server, agents and unchanged applications.

Everything is started the way an operator would: ``meshctl ca init`` publishes the trust
bundle, ``meshd serve`` runs in the Consul server's namespace, ``meshctl token create``
writes each host's 0600 bootstrap token, and ``meshd-agent run`` reads an ``agent.toml``
and ``services.d/`` written here. Applications and clients run as ``nobody`` (uid 65534).
By default the agent runs as root and root is the proxy user, whose own traffic is never
redirected; ``add_host(..., agent_uid=N)`` runs it as uid N with the shipped unit's
capabilities instead, as ``systemd/meshd-agent.service`` does with its ``meshd`` user.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshlab.netns import Host, Lab, Process

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
ECHO_APP = REPO / "meshlab" / "apps" / "echo.py"
APP_PYTHON = "/usr/bin/python3"  # readable by nobody, unlike a venv under /root
APP_UID = 65534
TRUST_DOMAIN = "11111111-2222-3333-4444-555555555555.consul"
MESHD_PORT = 8555
ADMIN_PORT = 15000
SOCKHOLDER = REPO / "meshlab" / "apps" / "sockholder.py"
SOCKET_UNIT = REPO / "systemd" / "meshd-agent.socket"
SERVICE_UNIT = REPO / "systemd" / "meshd-agent.service"


@dataclass(frozen=True)
class ServiceSpec:
    """One service a host runs: its name, port, the upstreams it declares, and the user its
    application runs as (``""``: not said)."""

    name: str
    port: int
    upstreams: tuple[str, ...] = ()
    protocol: str = "tcp"
    user: str = ""


@dataclass
class MeshHost:
    """A lab host with its agent files."""

    host: Host
    dir: Path
    services: tuple[ServiceSpec, ...] = ()
    agent_uid: int | None = None
    agent: Process | None = None
    apps: list[Process] = field(default_factory=list)


def as_user(uid: int, argv: Sequence[str]) -> list[str]:
    """*argv* run as *uid* (and its group), with no supplementary groups."""
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *argv]


def as_app_user(argv: Sequence[str]) -> list[str]:
    """*argv* run as the unprivileged application user (so its traffic is intercepted)."""
    return as_user(APP_UID, argv)


def unit_capabilities() -> tuple[list[str], list[str]]:
    """The ambient and bounding capabilities of ``systemd/meshd-agent.service``, as setpriv
    names them (``net_admin``, ...)."""

    def names(key: str) -> list[str]:
        return [c.lower().removeprefix("cap_") for c in unit_setting(SERVICE_UNIT, key).split()]

    return names("AmbientCapabilities"), names("CapabilityBoundingSet")


def as_agent_user(uid: int, argv: Sequence[str]) -> list[str]:
    """*argv* run the way the shipped unit runs the agent: as a user of its own (*uid*),
    with the unit's ambient capabilities, its bounding set and no new privileges.

    One capability is added for the lab only: ``dac_read_search``, to reach the checkout
    and its virtualenv, which may sit under ``/root`` (mode 0700). It lets the agent read
    any file; writing still needs ownership, so the host's state directory is the uid's.
    """
    ambient, bounding = unit_capabilities()
    ambient, bounding = [*ambient, "dac_read_search"], [*bounding, "dac_read_search"]
    caps = ",".join(f"+{c}" for c in ambient)
    return as_user(uid, [
        f"--inh-caps={caps}", f"--ambient-caps={caps}",
        "--bounding-set=-all," + ",".join(f"+{c}" for c in bounding),
        "--no-new-privs", *argv,
    ])  # fmt: skip


# One TCP exchange: connect, send argv[4] (bytes via surrogateescape), half-close, print
# everything that comes back; exit status 1 on any error.
_EXCHANGE = (
    "import os,socket,sys\n"
    "s=socket.create_connection((sys.argv[1],int(sys.argv[2])),timeout=float(sys.argv[3]))\n"
    "s.sendall(os.fsencode(sys.argv[4]));s.shutdown(socket.SHUT_WR)\n"
    "data=b''\n"
    "while True:\n"
    "    chunk=s.recv(65536)\n"
    "    if not chunk: break\n"
    "    data+=chunk\n"
    "sys.stdout.write(data.decode('utf-8','replace'))\n"
)


def exchange_argv(address: str, port: int, payload: bytes, *, timeout_s: float = 5.0) -> list[str]:
    """argv of a client that sends *payload* to *address*:*port*, half-closes and prints
    the reply (run it as the app user to be intercepted, as root to bypass the proxy)."""
    return [APP_PYTHON, "-c", _EXCHANGE, address, str(port), str(timeout_s),
            os.fsdecode(payload)]  # fmt: skip


class Mesh:
    """The mesh on top of a :class:`~meshlab.netns.Lab`."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.workdir = lab.workdir / "mesh"
        self.workdir.mkdir(mode=0o700, exist_ok=True)
        self.hosts: dict[str, MeshHost] = {}
        self.meshd: Process | None = None

    # -- control plane --------------------------------------------------------------
    def consul_env(self) -> dict[str, str]:
        """Environment for meshctl run from the root namespace."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONSUL_")}
        env["CONSUL_HTTP_ADDR"] = f"http://{self.lab.server_address}:8500"
        return env

    def meshctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``meshctl`` against the lab's Consul."""
        return subprocess.run(
            [str(BIN / "meshctl"), *args],
            env=self.consul_env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=check,
        )

    def start_control_plane(self) -> None:
        """``meshctl ca init`` then ``meshd serve`` in the Consul server's namespace."""
        ca_dir = self.workdir / "ca"
        self.meshctl("ca", "init", "--dir", str(ca_dir), "--trust-domain", TRUST_DOMAIN)
        config = self.workdir / "meshd.toml"
        config.write_text(
            f'[server]\nlisten = "0.0.0.0:{MESHD_PORT}"\n'
            f'advertise_address = "{self.lab.server_address}"\nname = "meshd-1"\n'
            f'[ca]\ndir = "{ca_dir}"\nleaf_ttl = "24h"\n'
            '[consul]\naddress = "http://127.0.0.1:8500"\n'
        )
        assert self.lab.server is not None
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONSUL_")}
        self.meshd = self.lab.server.spawn(
            "meshd", [str(BIN / "meshd"), "serve", "--config", str(config)], env=env
        )
        self.wait_passing("meshd", 1, timeout_s=30)

    # -- hosts ---------------------------------------------------------------------
    def add_host(
        self,
        name: str,
        services: Sequence[ServiceSpec],
        *,
        proxy: Mapping[str, str | int] | None = None,
        agent_uid: int | None = None,
    ) -> MeshHost:
        """Write *name*'s agent.toml, services.d/ and bootstrap token (nothing started).

        *proxy*: more ``[proxy]`` settings for this host's agent.toml.
        *agent_uid*: run the agent as this uid (the proxy user), with the shipped unit's
        capabilities (:func:`as_agent_user`); it owns the state directory and the token, as
        the Ansible role arranges for the ``meshd`` user. Default: root.
        """
        host = self.lab.hosts[name]
        hdir = self.workdir / name
        (hdir / "services.d").mkdir(parents=True, exist_ok=True)
        mh = MeshHost(host, hdir, tuple(services), agent_uid=agent_uid)
        self.hosts[name] = mh
        self._write_agent_files(mh, proxy or {})
        token = hdir / "bootstrap.token"
        if services:
            args = ["token", "create", "--host", name, "--ttl", "1h"]
            for spec in services:
                args += ["--service", spec.name]
            self.meshctl(*args, "--output", str(token))
        if agent_uid is not None:
            self._give_host_dir(hdir, agent_uid)
        return mh

    def _give_host_dir(self, hdir: Path, uid: int) -> None:
        """The host's files become *uid*'s, and the directories above them searchable (not
        listable): ``access(2)``, which click's path checks use, ignores capabilities."""
        for parent in (self.lab.workdir, self.workdir):
            parent.chmod(parent.stat().st_mode | 0o001)
        (hdir / "state").mkdir(mode=0o700, exist_ok=True)
        for path in (hdir, *hdir.rglob("*")):
            os.chown(path, uid, uid)

    def _write_agent_files(self, mh: MeshHost, proxy: Mapping[str, str | int]) -> None:
        hdir = mh.dir
        user = "root" if mh.agent_uid is None else str(mh.agent_uid)
        extra = "".join(f"{key} = {json.dumps(value)}\n" for key, value in proxy.items())
        (hdir / "agent.toml").write_text(
            f'[agent]\nnode_name = "{mh.host.name}"\ndatacenter = "dc1"\n'
            f'state_dir = "{hdir / "state"}"\nservices_dir = "{hdir / "services.d"}"\n'
            f'bootstrap_token_file = "{hdir / "bootstrap.token"}"\n'
            '[consul]\naddress = "http://127.0.0.1:8500"\n'
            f'[meshd]\naddresses = ["https://{self.lab.server_address}:{MESHD_PORT}"]\n'
            f'[proxy]\nuser = "{user}"\ndrain_timeout = "10s"\n'
            f"{extra}"
            '[log]\nlevel = "info"\n'
        )
        for spec in mh.services:
            upstreams = ", ".join(json.dumps(u) for u in spec.upstreams)
            run_as = f'user = "{spec.user}"\n' if spec.user else ""
            (hdir / "services.d" / f"{spec.name}.toml").write_text(
                f'[service]\nname = "{spec.name}"\nport = {spec.port}\n'
                f'protocol = "{spec.protocol}"\nupstreams = [{upstreams}]\n{run_as}'
                '[[service.checks]]\nkind = "tcp"\ninterval = "1s"\ntimeout = "1s"\n'
            )

    def start_agent(
        self,
        name: str,
        *,
        socket_activated: bool = False,
        path_first: Sequence[Path] = (),
        wait_ready: bool = True,
    ) -> Process:
        """Start ``meshd-agent run`` on host *name* and wait until it serves a snapshot.

        *path_first*: directories put ahead of ``PATH`` (tools that fail on purpose).
        *wait_ready*: False returns at once, for an agent expected to give up.

        *socket_activated*: under ``meshlab/apps/sockholder.py``, which holds the listening
        sockets of ``systemd/meshd-agent.socket`` as systemd would, so that
        :meth:`restart_agent_in_place` restarts the agent the way ``systemctl restart``
        does, and restarts an agent that died after the unit's ``RestartSec``. The
        returned process is then the holder (stopping it stops the agent).
        """
        mh = self.hosts[name]
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONSUL_")}
        if path_first:
            env["PATH"] = ":".join([*map(str, path_first), env.get("PATH", "/usr/sbin:/usr/bin")])
        argv = [str(BIN / "meshd-agent"), "run", "--config", str(mh.dir / "agent.toml")]
        if socket_activated:
            listen = [arg for spec in unit_sockets() for arg in ("--listen", spec)]
            restart = ["--restart-sec", str(unit_setting(SERVICE_UNIT, "RestartSec"))]
            argv = [sys.executable, str(SOCKHOLDER), *listen, *restart, "--", *argv]
        if mh.agent_uid is not None:
            argv = as_agent_user(mh.agent_uid, argv)
        mh.agent = mh.host.spawn("agent", argv, env=env)
        if wait_ready:
            self.wait_admin(name, "/ready")
        return mh.agent

    def restart_agent_in_place(self, name: str, *, timeout_s: float = 60.0) -> int:
        """``systemctl restart`` of a socket-activated agent: the holder stops it (SIGTERM,
        its drain) and starts a new one on the same sockets; returns when the new one is
        ready, with its PID."""
        holder = self.hosts[name].agent
        assert holder is not None and holder.alive()
        before = holder_pids(holder)
        os.kill(holder.pid, signal.SIGHUP)
        deadline = time.monotonic() + timeout_s
        while len(holder_pids(holder)) == len(before):
            if time.monotonic() > deadline or not holder.alive():
                raise TimeoutError(f"agent on {name} not restarted:\n{holder.log()[-4000:]}")
            time.sleep(0.05)
        self.wait_admin(name, "/ready", timeout_s=max(1.0, deadline - time.monotonic()))
        return holder_pids(holder)[-1]

    def wait_admin(self, name: str, path: str, *, timeout_s: float = 30.0) -> str:
        """Poll the agent's admin endpoint on host *name* until it answers 200."""
        mh = self.hosts[name]
        deadline = time.monotonic() + timeout_s
        out = ""
        while time.monotonic() < deadline:
            if mh.agent is not None and not mh.agent.alive():
                raise RuntimeError(f"agent on {name} exited:\n{mh.agent.log()[-4000:]}")
            res = self.admin(name, path)
            if res.returncode == 0:
                return res.stdout
            out = res.stdout + res.stderr
            time.sleep(0.2)
        log = mh.agent.log()[-4000:] if mh.agent else ""
        raise TimeoutError(f"agent on {name}: {path} not ready in {timeout_s}s: {out}\n{log}")

    def events(self, name: str, event: str) -> list[dict[str, Any]]:
        """The JSON log lines of host *name*'s current agent whose ``event`` is *event*
        (``"access"``: one per proxied connection)."""
        agent = self.hosts[name].agent
        if agent is None:
            raise RuntimeError(f"no agent was started on {name}")
        found = []
        for raw in agent.log().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                record = json.loads(raw)
                if isinstance(record, dict) and record.get("event") == event:
                    found.append(record)
        return found

    def admin(self, name: str, path: str) -> subprocess.CompletedProcess[str]:
        """GET the agent's admin *path* on host *name* (curl inside the namespace)."""
        url = f"http://127.0.0.1:{ADMIN_PORT}{path}"
        return self.hosts[name].host.run(["curl", "-sf", "--max-time", "5", url], check=False)

    def start_app(
        self, name: str, port: int, *, mode: str = "whoami", log_connections: bool = False
    ) -> Process:
        """Start the unchanged echo application on host *name*, as the app user.

        With *log_connections* the app logs one ``conn <peer> bytes=<n>`` line per connection.
        """
        mh = self.hosts[name]
        argv = as_app_user(
            [APP_PYTHON, str(ECHO_APP), "--port", str(port), "--mode", mode, "--name", name]
            + (["--log-connections"] if log_connections else [])
        )
        proc = mh.host.spawn(f"app{port}", argv)
        deadline = time.monotonic() + 10
        while "ready" not in proc.log():
            if not proc.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"app on {name}:{port} did not start: {proc.log()}")
            time.sleep(0.05)
        mh.apps.append(proc)
        return proc

    def wait_passing(self, service: str, count: int, *, timeout_s: float = 30.0) -> None:
        """Wait until Consul has *count* passing instances of *service*."""
        url = f"http://{self.lab.server_address}:8500/v1/health/service/{service}?passing=1"
        deadline = time.monotonic() + timeout_s
        found = -1
        while time.monotonic() < deadline:
            res = subprocess.run(["curl", "-sf", url], capture_output=True, text=True, check=False)
            if res.returncode == 0:
                found = len(json.loads(res.stdout))
                if found == count:
                    return
            time.sleep(0.2)
        raise TimeoutError(f"{service}: {found} passing instances, wanted {count}")

    # -- clients ---------------------------------------------------------------------
    def call(
        self,
        name: str,
        address: str,
        port: int,
        payload: bytes = b"ping\n",
        *,
        timeout_s: float = 5.0,
    ) -> subprocess.CompletedProcess[str]:
        """Connect from host *name* as the app user, send *payload*, half-close, read all.

        stdout is what came back; the exit status is 0 on a clean exchange, 1 on error.
        """
        return self.hosts[name].host.run(
            as_app_user(exchange_argv(address, port, payload, timeout_s=timeout_s)),
            check=False,
            timeout=timeout_s + 5,
        )

    def describe(self) -> str:
        """A shell-friendly summary of the hosts (for the demo's printout)."""
        lines = []
        for name, mh in self.hosts.items():
            ports = ", ".join(f"{s.name}:{s.port}" for s in mh.services)
            ns = shlex.quote(mh.host.netns)
            lines.append(f"  {name:<5} {mh.host.address:<13} netns {ns:<16} {ports}")
        return "\n".join(lines)


def unit_sockets() -> list[str]:
    """The ``ListenStream=`` addresses of ``systemd/meshd-agent.socket``, as shipped."""
    return [
        line.split("=", 1)[1].strip()
        for line in SOCKET_UNIT.read_text().splitlines()
        if line.startswith("ListenStream=")
    ]


def unit_setting(unit: Path, key: str) -> str:
    """The value of *key* in a shipped systemd unit (the last one, as systemd reads it)."""
    values = [
        line.split("=", 1)[1].strip()
        for line in unit.read_text().splitlines()
        if line.startswith(f"{key}=")
    ]
    if not values:
        raise KeyError(f"{unit.name} sets no {key}")
    return values[-1]


def holder_pids(holder: Process) -> list[int]:
    """The PIDs of the agents a sockholder has started so far, in order."""
    pids = []
    for line in holder.log().splitlines():
        if line.startswith('{"holder": "started"'):
            pids.append(int(json.loads(line)["pid"]))
    return pids
