"""``meshctl stat``: golden metrics per service, from every agent's metrics port.

The agents are found as Prometheus finds them (:mod:`cli.scrape`), scraped twice a window
apart, and their counters added up per service (:mod:`meshd.golden`). Nothing is written
anywhere. An agent that cannot be scraped is named, and the command exits 1: its share is
missing from the table.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import click
import trio

from cli.intention import format_option
from cli.output import table
from cli.scrape import http_client, metrics_target, scrape
from meshd.consul import ConsulSettings, open_consul
from meshd.golden import ServiceStat, golden, merge
from meshd.registry import AGENT_SERVICE

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
    targets = sorted({t for i in instances if (t := metrics_target(i)) is not None})
    if not targets:
        raise click.ClickException(
            f"no agent serves metrics: Consul lists {len(instances)} {AGENT_SERVICE}"
            " instance(s), none with a metrics port"
        )
    async with http_client() as http:
        first = await scrape(http, targets)
        start = trio.current_time()
        await trio.sleep(window)
        second = await scrape(http, targets)
        elapsed = trio.current_time() - start
    # An agent missing from either round is left out of both, so no rate is made of half.
    both = {t for t in targets if t in first.pages and t in second.pages}
    failed = tuple(
        f"{t}: {second.failed.get(t) or first.failed.get(t)}" for t in targets if t not in both
    )
    before = merge(page for t, page in first.pages.items() if t in both)
    after = merge(page for t, page in second.pages.items() if t in both)
    return golden(before, after, elapsed), Scrape(len(both), failed)


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
