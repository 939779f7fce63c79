"""``meshctl stat``: golden metrics per service, from every agent's metrics port.

The agents are found as Prometheus finds them (service ``meshd-agent`` in Consul, the
port in meta ``meshd-metrics-port``), scraped twice a window apart, and their counters
added up per service (:mod:`meshd.golden`). Nothing is written anywhere. An agent that
cannot be scraped is named, and the command exits 1: its share is missing from the table.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import click
import httpx
import trio

from cli.intention import format_option
from cli.output import table
from meshd.consul import ConsulSettings, ServiceInstance, open_consul
from meshd.golden import MetricsFormatError, Samples, ServiceStat, golden, merge, parse_metrics
from meshd.registry import AGENT_SERVICE, META_METRICS_PORT

SCRAPE_CONCURRENCY = 16
SCRAPE_TIMEOUT_S = 5.0
MAX_PAGE_BYTES = 16 * 1024 * 1024
EXIT_PROBLEMS = 1


@dataclass(frozen=True)
class Scrape:
    """Both rounds over the agents: how many agents were read both times, and
    ``"address:port: why"`` for each that was not."""

    scraped: int
    failed: tuple[str, ...]


@click.command("stat")
@click.option(
    "--window",
    type=click.FloatRange(0.5, 300),
    default=5.0,
    show_default=True,
    help="Seconds between the two scrapes the rates come from.",
)
@format_option
@click.pass_context
def stat(ctx: click.Context, window: float, fmt: str) -> None:
    """Connections, success, denials and bytes per service, over a window (L4)."""
    stats, last = trio.run(_measure, window)
    if fmt == "json":
        click.echo(json.dumps(_json(stats, last, window), indent=2))
    else:
        click.echo(_text(stats, last, window))
    if last.failed:
        ctx.exit(EXIT_PROBLEMS)


async def _measure(window: float) -> tuple[list[ServiceStat], Scrape]:
    async with open_consul(ConsulSettings.from_env()) as consul:
        _, instances = await consul.health_service(AGENT_SERVICE, passing_only=False)
    targets = sorted({_target(i) for i in instances if META_METRICS_PORT in i.meta})
    if not targets:
        raise click.ClickException(
            f"no agent serves metrics: Consul lists {len(instances)} {AGENT_SERVICE}"
            " instance(s), none with a metrics port"
        )
    async with httpx.AsyncClient(trust_env=False, timeout=SCRAPE_TIMEOUT_S) as http:
        first = await _scrape(http, targets)
        start = trio.current_time()
        await trio.sleep(window)
        second = await _scrape(http, targets)
        elapsed = trio.current_time() - start
    # An agent missing from either round is left out of both, so no rate is made of half.
    both = {t for t in targets if t in first.pages and t in second.pages}
    failed = tuple(
        f"{t}: {second.failed.get(t) or first.failed.get(t)}" for t in targets if t not in both
    )
    before = merge(page for t, page in first.pages.items() if t in both)
    after = merge(page for t, page in second.pages.items() if t in both)
    return golden(before, after, elapsed), Scrape(len(both), failed)


def _target(instance: ServiceInstance) -> str:
    host = instance.address
    if ":" in host:
        host = f"[{host}]"
    return f"{host}:{instance.meta[META_METRICS_PORT]}"


@dataclass(frozen=True)
class _Round:
    pages: dict[str, Samples]
    failed: dict[str, str]  # target: why


async def _scrape(http: httpx.AsyncClient, targets: Sequence[str]) -> _Round:
    found = _Round({}, {})
    limiter = trio.CapacityLimiter(SCRAPE_CONCURRENCY)

    async def one(target: str) -> None:
        async with limiter:
            try:
                found.pages[target] = await _page(http, target)
            except (httpx.HTTPError, MetricsFormatError, UnicodeDecodeError) as exc:
                found.failed[target] = str(exc) or type(exc).__name__

    async with trio.open_nursery() as nursery:
        for target in targets:
            nursery.start_soon(one, target)
    return found


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


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _text(stats: list[ServiceStat], last: Scrape, window: float) -> str:
    header = ("SERVICE", "CONN/S", "SUCCESS", "DENIED/S", "CALLER FAIL/S", "IN B/S", "OUT B/S")
    rows = [
        (
            s.service,
            f"{s.rate(s.connections):.2f}",
            _percent(s.success),
            f"{s.rate(s.denied):.2f}",
            f"{s.rate(s.caller_failures):.2f}",
            f"{s.rate(s.bytes_in):.0f}",
            f"{s.rate(s.bytes_out):.0f}",
        )
        for s in stats
    ]
    lines = [
        f"{last.scraped} agent(s) scraped twice, {window:g} s apart;"
        " connections finished in that window (L4).",
        table(header, rows) if rows else "No service carried a connection in the window.",
    ]
    lines += [f"unreachable: {why} (its counts are missing above)" for why in last.failed]
    return "\n".join(lines)


def _json(stats: list[ServiceStat], last: Scrape, window: float) -> dict[str, object]:
    return {
        "window_s": window,
        "agents_scraped": last.scraped,
        "agents_unreachable": list(last.failed),
        "services": [
            {
                "service": s.service,
                "connections": s.connections,
                "connections_per_s": s.rate(s.connections),
                "success": s.success,
                "denied": s.denied,
                "caller_failures": s.caller_failures,
                "bytes_in": s.bytes_in,
                "bytes_out": s.bytes_out,
            }
            for s in stats
        ],
    }
