"""Reading the agents' ``/metrics`` pages, for ``meshctl stat`` and ``meshctl check``.

The agents are found as Prometheus finds them: service ``meshd-agent`` in Consul, the port
in meta ``meshd-metrics-port``. A page is read with a size bound and parsed by
:func:`meshd.golden.parse_metrics`; an agent that cannot be read is reported with why,
never skipped in silence. That includes a registration whose port or address makes no
URL: meta is free text in Consul, and anyone with ``service:write`` may write it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import httpx
import trio

from meshd.consul import ServiceInstance
from meshd.golden import MetricsFormatError, Samples, parse_metrics
from meshd.registry import META_METRICS_PORT

SCRAPE_CONCURRENCY = 16
SCRAPE_TIMEOUT_S = 5.0
MAX_PAGE_BYTES = 16 * 1024 * 1024
_PORT = re.compile(r"[0-9]{1,5}")


class TargetError(ValueError):
    """A target that names no address and port to read."""


def metrics_target(instance: ServiceInstance) -> str | None:
    """``address:port`` of an agent's metrics port, or None when it serves none.

    The port is as registered, checked only when the target is scraped (:func:`scrape`
    reports a bad one as that agent's failure).
    """
    port = instance.meta.get(META_METRICS_PORT)
    if port is None:
        return None
    host = instance.address
    if ":" in host:
        host = f"[{host}]"
    return f"{host}:{port}"


def http_client() -> httpx.AsyncClient:
    """A client for scrapes: no proxy from the environment, a timeout per request."""
    return httpx.AsyncClient(trust_env=False, timeout=SCRAPE_TIMEOUT_S)


@dataclass(frozen=True)
class Round:
    """One scrape of several agents: the pages read, and why each other one was not."""

    pages: dict[str, Samples] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # target: why


async def scrape(http: httpx.AsyncClient, targets: Sequence[str]) -> Round:
    """Read every target's page, at most :data:`SCRAPE_CONCURRENCY` at once."""
    found = Round()
    limiter = trio.CapacityLimiter(SCRAPE_CONCURRENCY)

    async def one(target: str) -> None:
        async with limiter:
            try:
                _check_target(target)
                found.pages[target] = await _page(http, target)
            except (
                TargetError,
                httpx.HTTPError,
                httpx.InvalidURL,  # not an HTTPError
                MetricsFormatError,
                UnicodeDecodeError,
            ) as exc:
                found.failed[target] = str(exc) or type(exc).__name__

    async with trio.open_nursery() as nursery:
        for target in targets:
            nursery.start_soon(one, target)
    return found


def _check_target(target: str) -> None:
    """Refuse a target whose port (``meshd-metrics-port``) is not a port number."""
    port = target.rpartition(":")[2]
    if not (_PORT.fullmatch(port) and 1 <= int(port) <= 65535):
        raise TargetError(f"meta {META_METRICS_PORT} {port!r} is not a port (1-65535)")


async def _page(http: httpx.AsyncClient, target: str) -> Samples:
    async with http.stream("GET", f"http://{target}/metrics") as reply:
        if reply.status_code != 200:
            raise MetricsFormatError(f"HTTP {reply.status_code}")
        body = b""
        async for chunk in reply.aiter_bytes():
            body += chunk
            if len(body) > MAX_PAGE_BYTES:
                raise MetricsFormatError(f"more than {MAX_PAGE_BYTES} bytes")
    return parse_metrics(body.decode("utf-8"))
