"""The test Consul of the scale benchmark: start, populate, flip health, stop.

One ``consul agent -dev`` on free loopback ports, configured by a JSON file in a temporary
directory. The catalog is populated with ``/v1/catalog/register`` (external nodes, no agent
on them, one passing service check per instance), except for a few *probe* instances that
are registered with the dev agent itself and carry TTL checks: the benchmark fails and
passes those through ``/v1/agent/check/*``, the path a real health check takes.

Naming (shared with the measured driver, :mod:`bench.scale_agent`):
instance ``k`` (0..M-1) belongs to service ``k % N`` (:func:`service_name`), lives on node
``k % nodes`` (about ten instances per node) and listens on port ``20000 + k``.
"""

from __future__ import annotations

import concurrent.futures
import math
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from meshlab.devconsul import DevConsul, free_ports

STOP_TIMEOUT_S = 5.0
INSTANCES_PER_NODE = 10
BASE_PORT = 20000
PROBE_TTL = "30m"
RETRIES = 5


def service_name(index: int) -> str:
    """The name of service number *index*."""
    return f"svc-{index:04d}"


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def node_address(node: int) -> str:
    """The address of external node number *node* (10.x.y.z, never loopback)."""
    return f"10.{1 + node // 62500}.{(node // 250) % 250}.{1 + node % 250}"


@dataclass(frozen=True)
class Probe:
    """An instance registered with the dev agent, its TTL check flipped by the benchmark."""

    service: str
    service_id: str
    port: int

    @property
    def check_id(self) -> str:
        return f"service:{self.service_id}"


class TestConsul:
    """A throw-away ``consul agent -dev`` (:class:`meshlab.devconsul.DevConsul`) with an
    HTTP client for populating it; :meth:`stop` ends it by PID."""

    def __init__(self, workdir: Path, *, http_max_conns_per_client: int | None = None) -> None:
        self.node_name = "scale-consul"
        http, server, serf_lan, serf_wan = free_ports(4)
        extra: dict[str, object] = {}
        if http_max_conns_per_client is not None:
            extra["limits"] = {"http_max_conns_per_client": http_max_conns_per_client}
        self.agent = DevConsul(
            workdir,
            node_name=self.node_name,
            ports={
                "http": http,
                "dns": -1,
                "grpc": -1,
                "server": server,
                "serf_lan": serf_lan,
                "serf_wan": serf_wan,
            },
            extra=extra,
            log_level="warn",
            new_session=True,
            stop_timeout_s=STOP_TIMEOUT_S,
        )
        self.address = self.agent.http_address
        self._http: httpx.Client | None = None
        self.retries = 0
        self.last_attempt_at = 0.0

    @property
    def pid(self) -> int | None:
        return self.agent.pid

    @property
    def http(self) -> httpx.Client:
        if self._http is None:
            limits = httpx.Limits(max_connections=8, max_keepalive_connections=8)
            self._http = httpx.Client(
                base_url=self.address, timeout=10.0, trust_env=False, limits=limits
            )
        return self._http

    def start(self) -> None:
        """Start and wait for a leader and a healthy dev node (bounded)."""
        self.agent.start()

    def stop(self) -> None:
        """End the agent by PID: SIGTERM, then SIGKILL after a grace period."""
        if self._http is not None:
            self._http.close()
            self._http = None
        self.agent.stop()

    # -- population -------------------------------------------------------------------

    def populate(self, services: int, instances: int, probes: list[int]) -> list[Probe]:
        """Register *instances* instances of *services* services; return the probes.

        Instances numbered in *probes* (below *services*: replica 0 of those services) go
        to the dev agent with a passing TTL check; all others to external nodes via the
        catalog.
        """
        if instances < services or any(not 0 <= k < services for k in probes):
            raise ValueError("need one instance per service, probes among the first replicas")
        nodes = max(1, math.ceil(instances / INSTANCES_PER_NODE))
        probe_list = [
            Probe(service_name(k), f"{service_name(k)}-{k}", BASE_PORT + k) for k in probes
        ]
        for probe in probe_list:
            self.register_probe(probe)
        payloads, probe_set = [], set(probes)
        for k in range(instances):
            if k in probe_set:
                continue
            name, node = service_name(k % services), k % nodes
            sid = f"{name}-{k}"
            payloads.append(
                {
                    "Node": f"host-{node:04d}",
                    "Address": node_address(node),
                    "Service": {"ID": sid, "Service": name, "Port": BASE_PORT + k},
                    "Check": {
                        "CheckID": f"service:{sid}",
                        "Name": f"{name} alive",
                        "Status": "passing",
                        "ServiceID": sid,
                    },
                }
            )

        with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
            for future in [pool.submit(self.put, "/v1/catalog/register", p) for p in payloads]:
                future.result()
        return probe_list

    def put(self, path: str, body: object = None) -> None:
        """PUT with a few retries on connection errors (Consul closes connections over its
        per-client limit); :attr:`last_attempt_at` is when the successful attempt began."""
        for attempt in range(RETRIES):
            self.last_attempt_at = time.monotonic()
            try:
                self.http.put(path, json=body).raise_for_status()
            except httpx.TransportError:
                if attempt == RETRIES - 1:
                    raise
                self.retries += 1
                time.sleep(0.1 * (attempt + 1))
            else:
                return

    def register_probe(
        self, probe: Probe, *, service_id: str | None = None, port: int | None = None
    ) -> None:
        """Register *probe* (or a new instance of its service) with a passing TTL check."""
        sid = service_id or probe.service_id
        body = {
            "ID": sid,
            "Name": probe.service,
            "Address": "127.0.0.2",
            "Port": port or probe.port,
            "Check": {"CheckID": f"service:{sid}", "TTL": PROBE_TTL, "Status": "passing"},
        }
        self.put("/v1/agent/service/register", body)

    def deregister(self, service_id: str) -> None:
        """Deregister a service instance from the dev agent."""
        self.put(f"/v1/agent/service/deregister/{service_id}")

    def check(self, check_id: str, status: str) -> None:
        """Set a TTL check: ``pass`` or ``fail``."""
        self.put(f"/v1/agent/check/{status}/{check_id}")

    def catalog_counts(self) -> tuple[int, int]:
        """(services, instances) in the catalog, the dev agent's own ``consul`` excluded."""
        names = [n for n in self.http.get("/v1/catalog/services").json() if n != "consul"]
        total = 0
        for start in range(0, len(names), 200):

            def count(name: str) -> int:
                return len(self.http.get(f"/v1/catalog/service/{name}").json())

            with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
                total += sum(pool.map(count, names[start : start + 200]))
        return len(names), total
