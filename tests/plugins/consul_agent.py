"""Fixtures: a real Consul agent (``consul agent -dev``) on free loopback ports.

* ``consul_agent`` (session): one shared agent with ACLs on (default deny) and HTTPS next to
  HTTP. Use ``consul_agent.settings()`` (management token included) and unique KV prefixes /
  service names (``consul_kv_prefix``). Never stop or restart it.
* ``consul_settings``: ``consul_agent.settings()``, for the common case.
* ``consul_kv_prefix``: a unique ``test/<id>/`` prefix, deleted afterwards.
* ``private_consul_agent``: a fresh agent per test that the test may ``stop()``,
  ``start()`` or ``restart()`` (dev mode keeps state in memory: a restart empties it).

Processes are ended by PID; a failed start reports the agent's log.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from meshd.consul import ConsulSettings

CONSUL = "consul"

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
_KEEP = object()


def _free_ports(count: int) -> list[int]:
    """Ports free for both TCP and UDP on 127.0.0.1 (serf and DNS use both)."""
    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < count:
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            held.append(tcp)
            tcp.bind(("127.0.0.1", 0))
            port = tcp.getsockname()[1]
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            held.append(udp)
            try:
                udp.bind(("127.0.0.1", port))
            except OSError:
                continue
            ports.append(port)
    finally:
        for sock in held:
            sock.close()
    return ports


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


class ConsulAgentProcess:
    """One ``consul agent -dev`` process with its ports, TLS files and token."""

    def __init__(self, workdir: Path, *, node_name: str = "meshd-test") -> None:
        self.workdir = workdir
        self.node_name = node_name
        self.datacenter = "dc1"
        self.token = str(uuid.uuid4())  # the management token, fresh per agent
        http, https, dns, serf_lan, serf_wan, server = _free_ports(6)
        self.http_address = f"http://127.0.0.1:{http}"
        self.https_address = f"https://127.0.0.1:{https}"
        ca = trustme.CA()
        leaf = ca.issue_cert("127.0.0.1", "localhost")
        self.ca_file = workdir / "ca.pem"
        self.ca_file.write_bytes(ca.cert_pem.bytes())
        (workdir / "server.pem").write_bytes(b"".join(p.bytes() for p in leaf.cert_chain_pems))
        _write_private(workdir / "server-key.pem", leaf.private_key_pem.bytes())
        config = {
            "node_name": node_name,
            "datacenter": self.datacenter,
            "bind_addr": "127.0.0.1",
            "client_addr": "127.0.0.1",
            "disable_update_check": True,
            "log_level": "info",
            "ports": {
                "http": http,
                "https": https,
                "dns": dns,
                "serf_lan": serf_lan,
                "serf_wan": serf_wan,
                "server": server,
                "grpc": -1,
            },
            "cert_file": str(workdir / "server.pem"),
            "key_file": str(workdir / "server-key.pem"),
            "acl": {
                "enabled": True,
                "default_policy": "deny",
                "down_policy": "extend-cache",
                "tokens": {"master": self.token, "agent": self.token},
            },
        }
        self.config_file = workdir / "consul.json"
        self.config_file.write_text(json.dumps(config))
        self.log_file = workdir / "consul.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        """PID of the running agent, or None."""
        return None if self._process is None else self._process.pid

    def settings(self, *, token: object = _KEEP, tls: bool = False) -> ConsulSettings:
        """Settings reaching this agent (HTTP, management token) unless told otherwise."""
        return ConsulSettings(
            address=self.https_address if tls else self.http_address,
            token=self.token if token is _KEEP else token,  # type: ignore[arg-type]
            ca_file=self.ca_file if tls else None,
            timeout_s=5.0,
        )

    def env(self) -> dict[str, str]:
        """``CONSUL_HTTP_ADDR`` / ``CONSUL_HTTP_TOKEN`` for a child process or from_env."""
        return {"CONSUL_HTTP_ADDR": self.http_address, "CONSUL_HTTP_TOKEN": self.token}

    def start(self) -> None:
        """Start the agent and wait until it has a leader and its node is healthy."""
        assert self._process is None, "already running"
        with self.log_file.open("ab") as log:
            self._process = subprocess.Popen(
                [
                    CONSUL,
                    "agent",
                    "-dev",
                    f"-config-file={self.config_file}",
                    f"-data-dir={self.workdir / 'data'}",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop the agent by PID (SIGTERM, then SIGKILL after a grace period)."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=STOP_TIMEOUT_S)

    def restart(self) -> None:
        """Stop and start again on the same ports (state is lost: dev mode)."""
        self.stop()
        self.start()

    def _get(self, path: str) -> object:
        request = urllib.request.Request(
            self.http_address + path, headers={"X-Consul-Token": self.token}
        )
        try:
            with urllib.request.urlopen(request, timeout=2) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            # An HTTPError holds the response and its socket; close it here, or the
            # garbage collector reports the socket as unclosed in some later test.
            exc.close()
            raise OSError(f"{path}: HTTP {exc.code} {exc.reason}") from None

    def kv_put(self, key: str, value: bytes) -> None:
        """Write one KV key with the management token (for setting up test state)."""
        request = urllib.request.Request(
            f"{self.http_address}/v1/kv/{key}",
            data=value,
            method="PUT",
            headers={"X-Consul-Token": self.token},
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            assert response.read().strip() == b"true", key

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        last: object = None
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                raise RuntimeError(f"consul exited ({self._process.returncode}):\n{self._log()}")
            try:
                checks = self._get(f"/v1/health/node/{self.node_name}")
                if self._get("/v1/status/leader") and any(
                    c.get("CheckID") == "serfHealth" and c.get("Status") == "passing"
                    for c in checks  # type: ignore[attr-defined]
                ):
                    return
            except (OSError, urllib.error.URLError, ValueError) as exc:
                last = exc
            time.sleep(0.05)
        raise RuntimeError(f"consul not ready in {START_TIMEOUT_S} s ({last}):\n{self._log()}")

    def _log(self) -> str:
        return self.log_file.read_text(errors="replace")[-4000:]


@pytest.fixture(scope="session")
def consul_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConsulAgentProcess]:
    """The shared Consul agent (ACLs default-deny; use its settings()). Do not stop it."""
    agent = ConsulAgentProcess(tmp_path_factory.mktemp("consul"))
    agent.start()
    try:
        yield agent
    finally:
        agent.stop()


@pytest.fixture
def consul_settings(consul_agent: ConsulAgentProcess) -> ConsulSettings:
    """Settings for the shared agent, management token included."""
    return consul_agent.settings()


@pytest.fixture
def consul_kv_prefix(consul_agent: ConsulAgentProcess) -> Iterator[str]:
    """A unique KV prefix ``test/<id>/`` on the shared agent, deleted after the test."""
    prefix = f"test/{uuid.uuid4().hex[:12]}/"
    yield prefix
    request = urllib.request.Request(
        f"{consul_agent.http_address}/v1/kv/{prefix}?recurse=true",
        method="DELETE",
        headers={"X-Consul-Token": consul_agent.token},
    )
    with urllib.request.urlopen(request, timeout=5):
        pass


@pytest.fixture
def private_consul_agent(tmp_path: Path) -> Iterator[ConsulAgentProcess]:
    """A fresh agent for this test alone; it may be stopped and restarted."""
    workdir = tmp_path / "consul"
    workdir.mkdir()
    agent = ConsulAgentProcess(workdir, node_name="meshd-private")
    agent.start()
    try:
        yield agent
    finally:
        agent.stop()
