"""The agent-worker link (docs/adr/011): framing over a real socketpair, hostile frames,
the certificates a worker holds, and /metrics as the sum of the agent and its workers."""

from __future__ import annotations

import json
import socket
import struct
from pathlib import Path

import pytest
import trio
from prometheus_client import generate_latest

from agent.metrics import AgentMetrics
from agent.workerlink import (
    MAX_FRAME,
    Link,
    LinkedCredentials,
    MergedMetrics,
    WorkerLinkError,
    certs_message,
    parse_certs,
    parse_report,
    registry_samples,
)


def _pair() -> tuple[Link, socket.socket]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return Link(trio.SocketStream(trio.socket.from_stdlib_socket(ours))), theirs


async def test_frames_round_trip_and_a_clean_end_reads_none() -> None:
    a, raw = _pair()
    b = Link(trio.SocketStream(trio.socket.from_stdlib_socket(raw)))
    await a.send_json({"type": "hello", "n": 1})
    await a.send_snapshot(b'{"version": 3}')
    assert await b.receive_json() == {"type": "hello", "n": 1}
    assert await b.receive() == (ord("S"), b'{"version": 3}')
    await a.aclose()
    assert await b.receive() is None
    await b.aclose()


@pytest.mark.parametrize(
    ("wire", "message"),
    [
        (struct.pack(">IB", 0, 74), "frame length 0 is outside"),
        (struct.pack(">IB", MAX_FRAME + 1, 74), f"frame length {MAX_FRAME + 1} is outside"),
        (struct.pack(">IB", 10, 74) + b"{}", "the link ended inside a frame"),
        (b"\x00\x00", "the link ended inside a frame"),
        (struct.pack(">IB", 4, 74) + b"{x}", "not valid JSON"),
        (struct.pack(">IB", 3, 74) + b"[]", "not an object with a string 'type'"),
        (struct.pack(">IB", 12, 74) + b'{"type": 1}', "not an object with a string 'type'"),
        (struct.pack(">IB", 3, 83) + b"{}", "expected a JSON frame, got kind 83"),
        (struct.pack(">IB", 3, 74) + b"\xff\xfe", "not valid JSON"),
    ],
)
async def test_hostile_frames_are_named_errors(wire: bytes, message: str) -> None:
    link, raw = _pair()
    raw.sendall(wire)
    raw.close()
    with pytest.raises(WorkerLinkError, match=message):
        await link.receive_json()
    await link.aclose()


class _Cert:
    def __init__(self, serial: int, not_after: float) -> None:
        self.chain_pem = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
        self.key_path = Path("/var/lib/meshd/certs/web.key")
        self.not_before = not_after - 100
        self.not_after = not_after
        self.serial = serial


def test_certificates_cross_as_chain_and_key_path_and_expire_on_the_worker() -> None:
    issued = {"web": _Cert(7, 1000.0)}
    message = certs_message(["web", "api"], issued.get)
    assert set(message["certs"]) == {"web"}  # api has none: the worker has none either
    assert "key_pem" not in str(message) and "PRIVATE" not in str(message)
    now = [999.0]
    creds = LinkedCredentials(lambda: now[0])
    creds.replace(parse_certs(message))
    cert = creds.current("web")
    assert cert is not None and cert.serial == 7 and cert.key_path == issued["web"].key_path
    assert cert.chain_pem == issued["web"].chain_pem
    assert creds.current("api") is None
    now[0] = 1000.0
    assert creds.current("web") is None  # expired: no context, connections are refused


def _entry(**fields: object) -> dict[str, object]:
    """A valid ``certs`` entry with *fields* changed (None: left out)."""
    entry = {"chain_pem": "x", "key_path": "k", "not_before": 0, "not_after": 1, "serial": 1}
    entry.update(fields)
    return {k: v for k, v in entry.items() if v is not None}


@pytest.mark.parametrize(
    ("certs", "message"),
    [
        ({"web": 5}, "the entry for 'web' is not an object"),
        ({"web": _entry(chain_pem=1)}, "chain_pem"),
        ({"web": _entry(not_after=True)}, "not_after"),
        ({"web": _entry(chain_pem="é")}, "not PEM"),
        ({"web": _entry(serial=None)}, "'serial' must be int"),
        ({"web": _entry(not_before=None)}, "not_before"),
    ],
)
def test_malformed_certs_messages_are_refused(certs: object, message: str) -> None:
    with pytest.raises(WorkerLinkError, match=message):
        parse_certs({"type": "certs", "certs": certs})


@pytest.mark.parametrize(
    "samples",
    [
        "x",
        [["a_total", {}, "1"]],
        [["a_total", {}, True]],
        [["a_total", {"k": 1}, 1.0]],
        [["a_total", {}]],
    ],
)
def test_malformed_reports_are_refused(samples: object) -> None:
    with pytest.raises(WorkerLinkError):
        parse_report({"type": "report", "samples": samples})


def _value(text: str, line_start: str) -> float:
    for line in text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {line_start} in\n{text}")


def test_metrics_are_the_sum_of_the_agent_and_its_workers() -> None:
    agent, worker = AgentMetrics(), AgentMetrics()
    agent.connections.labels("inbound", "web", "api", "closed").inc(3)
    worker.connections.labels("inbound", "web", "api", "closed").inc(4)
    worker.connections.labels("inbound", "web", "api", "refused").inc(2)  # only the worker
    for seconds in (0.002, 0.2):
        agent.duration.labels("inbound").observe(seconds)
        worker.duration.labels("inbound").observe(seconds)
    worker.warm_idle.set(5)
    # As it crosses the link: JSON.
    wire = json.loads(json.dumps({"type": "report", "samples": registry_samples(worker.registry)}))
    report = parse_report(wire)
    assert not [name for name, _, _ in report if name.endswith("_created")]
    text = generate_latest(MergedMetrics(agent.registry, lambda: [report])).decode()  # type: ignore[arg-type]
    base = 'meshd_tcp_connections_total{destination="api",direction="inbound",'
    assert _value(text, base + 'outcome="closed",source="web"}') == 7.0
    assert _value(text, base + 'outcome="refused",source="web"}') == 2.0
    assert _value(text, 'meshd_tcp_connection_duration_seconds_count{direction="inbound"}') == 4
    assert (
        _value(text, 'meshd_tcp_connection_duration_seconds_bucket{direction="inbound",le="0.005"}')
        == 2
    )
    assert _value(text, "meshd_warm_connections_idle ") == 5.0
    # With no worker reports it is the agent's registry as is.
    alone = generate_latest(MergedMetrics(agent.registry, lambda: [])).decode()  # type: ignore[arg-type]
    assert alone == generate_latest(agent.registry).decode()
