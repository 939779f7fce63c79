"""Fixtures: a real Consul agent (``consul agent -dev``) on free loopback ports.

* ``consul_agent`` (session): one shared agent with ACLs on (default deny) and HTTPS next to
  HTTP. Use ``consul_agent.settings()`` (management token included) and unique KV prefixes /
  service names (``consul_kv_prefix``). Never stop or restart it.
* ``consul_settings``: ``consul_agent.settings()``, for the common case.
* ``consul_kv_prefix``: a unique ``test/<id>/`` prefix, deleted afterwards.
* ``private_consul_agent``: a fresh agent per test that the test may ``stop()``,
  ``start()`` or ``restart()`` (dev mode keeps state in memory: a restart empties it).

The process itself (configuration, readiness, ending by PID, the log on a failed start) is
:class:`meshlab.devconsul.DevConsul`, shared with the scale benchmark.
"""

from __future__ import annotations

import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from meshd.consul import ConsulSettings
from meshd.keyfile import write_secret
from meshlab.devconsul import DevConsul, free_ports

_KEEP = object()


class ConsulAgentProcess(DevConsul):
    """One ``consul agent -dev`` with HTTPS next to HTTP and ACLs on (default deny).

    The management token is fresh per agent; the HTTPS certificate is issued by a trustme
    CA whose certificate is :attr:`ca_file`.
    """

    def __init__(self, workdir: Path, *, node_name: str = "meshd-test") -> None:
        token = str(uuid.uuid4())
        http, https, dns, serf_lan, serf_wan, server = free_ports(6)
        ca = trustme.CA()
        leaf = ca.issue_cert("127.0.0.1", "localhost")
        self.ca_file = workdir / "ca.pem"
        self.ca_file.write_bytes(ca.cert_pem.bytes())
        (workdir / "server.pem").write_bytes(b"".join(p.bytes() for p in leaf.cert_chain_pems))
        write_secret(workdir / "server-key.pem", leaf.private_key_pem.bytes(), overwrite=False)
        super().__init__(
            workdir,
            node_name=node_name,
            token=token,
            ports={
                "http": http,
                "https": https,
                "dns": dns,
                "serf_lan": serf_lan,
                "serf_wan": serf_wan,
                "server": server,
                "grpc": -1,
            },
            extra={
                "cert_file": str(workdir / "server.pem"),
                "key_file": str(workdir / "server-key.pem"),
                "acl": {
                    "enabled": True,
                    "default_policy": "deny",
                    "down_policy": "extend-cache",
                    "tokens": {"master": token, "agent": token},
                },
            },
        )
        self.https_address = f"https://127.0.0.1:{https}"

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
