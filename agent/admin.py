"""The agent's admin endpoint: ``/metrics``, ``/ready``, ``/stats`` and ``/snapshot``.

It listens on loopback and serves GET only; :func:`serve_metrics` serves ``/metrics``
alone on the metrics port, on every address, for Prometheus on other hosts. Requests are
read with a size limit and a deadline, answered, and the connection closed: the endpoint
exists for Prometheus and operators, not for throughput. Nothing it serves contains a
secret (the snapshot holds only public material; statistics hold no keys or tokens).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import trio
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from agent.metrics import AgentMetrics
from agent.workerlink import MergedMetrics, ReportedSample
from meshd.logevents import log_event

MAX_REQUEST_BYTES = 8192
REQUEST_TIMEOUT_S = 5.0
SEND_TIMEOUT_S = 10.0  # a client that does not read its answer is dropped after this

log = logging.getLogger("meshd.agent.admin")


@dataclass
class AdminSources:
    """Where the admin endpoint reads what it serves."""

    metrics: AgentMetrics
    ready: Callable[[], bool]
    stats: Callable[[], dict[str, Any]]
    snapshot_json: Callable[[], bytes | None]
    # The data-path workers' latest counters, added to the agent's own (``[proxy] workers``).
    worker_reports: Callable[[], list[list[ReportedSample]]] = field(default=lambda: [])


def _response(status: str, body: bytes, content_type: str) -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


def _metrics(sources: AdminSources) -> bytes:
    merged = MergedMetrics(sources.metrics.registry, sources.worker_reports)
    return _response("200 OK", generate_latest(merged), CONTENT_TYPE_LATEST)  # type: ignore[arg-type]


def _ready(sources: AdminSources) -> bytes:
    if sources.ready():
        return _response("200 OK", b"ready\n", "text/plain")
    return _response("503 Service Unavailable", b"not ready\n", "text/plain")


def _stats(sources: AdminSources) -> bytes:
    body = json.dumps(sources.stats(), indent=2, sort_keys=True, default=_jsonable).encode()
    return _response("200 OK", body + b"\n", "application/json")


def _jsonable(value: object) -> object:
    """A statistics value as JSON: a dataclass as an object of its fields (a field kept out
    of its repr stays out here too), a set as a sorted list, anything else as its text."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value) if f.repr}
    if isinstance(value, set | frozenset):
        return sorted(value, key=str)
    return str(value)


def _snapshot(sources: AdminSources) -> bytes:
    snap = sources.snapshot_json()
    if snap is None:
        return _response("503 Service Unavailable", b"no snapshot yet\n", "text/plain")
    return _response("200 OK", snap, "application/json")


_ROUTES: dict[str, Callable[[AdminSources], bytes]] = {
    "/metrics": _metrics,
    "/ready": _ready,
    "/stats": _stats,
    "/snapshot": _snapshot,
}


#: What the metrics port serves to other hosts: the metrics, and nothing else.
_METRICS_ONLY: dict[str, Callable[[AdminSources], bytes]] = {"/metrics": _metrics}
#: Connections the metrics port serves at once; more are closed on arrival.
MAX_METRICS_CONNECTIONS = 16


def route(
    sources: AdminSources,
    method: str,
    path: str,
    routes: Mapping[str, Callable[[AdminSources], bytes]] = _ROUTES,
) -> bytes:
    """The full HTTP response for one request (pure apart from reading *sources*)."""
    if method != "GET":
        return _response("405 Method Not Allowed", b"GET only\n", "text/plain")
    handler = routes.get(path.split("?", 1)[0])
    if handler is None:
        return _response("404 Not Found", b"not found\n", "text/plain")
    try:
        return handler(sources)
    except Exception as exc:  # a bug in one source must not end the agent
        log_event(log, logging.ERROR, "admin_failed", path=path[:100], error=repr(exc)[:300])
        return _response("500 Internal Server Error", b"internal error\n", "text/plain")


async def _handle(
    sources: AdminSources,
    stream: trio.SocketStream,
    routes: Mapping[str, Callable[[AdminSources], bytes]] = _ROUTES,
) -> None:
    """Serve one request; never raises (an exception here would end the listener, and with
    it the agent): a client that resets or stops reading is simply dropped."""
    # A client that went away has nobody to answer.
    gone = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)
    async with stream:
        with contextlib.suppress(*gone):
            await _exchange(sources, stream, routes)


async def _exchange(
    sources: AdminSources,
    stream: trio.SocketStream,
    routes: Mapping[str, Callable[[AdminSources], bytes]],
) -> None:
    data = b""
    with trio.move_on_after(REQUEST_TIMEOUT_S):
        while b"\r\n\r\n" not in data and len(data) < MAX_REQUEST_BYTES:
            chunk = await stream.receive_some(4096)
            if not chunk:
                return
            data += chunk
    line = data.split(b"\r\n", 1)[0].decode("latin-1")
    parts = line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        answer = _response("400 Bad Request", b"bad request\n", "text/plain")
    else:
        answer = route(sources, parts[0], parts[1], routes)
    with trio.move_on_after(SEND_TIMEOUT_S):
        await stream.send_all(answer)


async def serve_admin(
    sources: AdminSources,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the admin endpoint on *host*:*port* until cancelled; reports the bound port."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, lambda s: _handle(sources, s), listeners)
        task_status.started(bound)


async def serve_metrics(
    sources: AdminSources,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``/metrics`` alone on *host*:*port* (every address for ``""``) until cancelled,
    for Prometheus on other hosts; reports the bound port.

    Everything else of the admin endpoint (``/snapshot``, ``/stats``) stays on loopback.
    At most :data:`MAX_METRICS_CONNECTIONS` are served at once, each for at most
    ``REQUEST_TIMEOUT_S`` of reading; more are closed on arrival.
    """
    listeners = await trio.open_tcp_listeners(port, host=host or None)
    bound = listeners[0].socket.getsockname()[1]
    active = 0

    async def handle(stream: trio.SocketStream) -> None:
        nonlocal active
        if active >= MAX_METRICS_CONNECTIONS:
            await stream.aclose()
            return
        active += 1
        try:
            await _handle(sources, stream, _METRICS_ONLY)
        finally:
            active -= 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, handle, listeners)
        task_status.started(bound)
