"""Golden metrics per service from the agents' own counters (``meshd.golden``).

The pages are what :class:`agent.metrics.AgentMetrics` really exposes (``generate_latest``),
not hand-written text, so a renamed metric or label fails here.
"""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest

from agent.metrics import AgentMetrics
from meshd.golden import MetricsFormatError, ServiceStat, golden, merge, parse_metrics


def page(metrics: AgentMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return parse_metrics(generate_latest(metrics.registry).decode())


def test_per_service_counts_from_the_service_side_and_its_callers() -> None:
    api_host, web_host = AgentMetrics(), AgentMetrics()  # api's agent, and a caller's
    before = merge([page(api_host), page(web_host)])
    conns = api_host.connections
    conns.labels("inbound", "web", "api", "closed").inc(90)
    conns.labels("inbound", "web", "api", "idle_timeout").inc(5)
    conns.labels("inbound", "198.18.1.10:4000", "api", "refused").inc(5)
    api_host.authz_denied.labels("admin", "api").inc(5)
    api_host.bytes.labels("inbound", "api", "to_upstream").inc(1000)
    api_host.bytes.labels("inbound", "api", "to_downstream").inc(50_000)
    web_host.connections.labels("outbound", "web", "api", "closed").inc(95)
    web_host.connections.labels("outbound", "web", "api", "upstream_failed").inc(3)
    web_host.connections.labels("outbound", "web", "db", "refused").inc(2)
    # Not mesh services: a passthrough address and a connection with no destination.
    web_host.connections.labels("outbound", "web", "10.9.9.9:80", "connect_failed").inc(7)
    web_host.connections.labels("outbound", "198.18.1.10:4001", "?", "no_snapshot").inc(1)
    after = merge([page(api_host), page(web_host)])

    stats = golden(before, after, window_s=10.0)
    assert stats == [
        ServiceStat("api", connections=100, good=95, denied=5, caller_failures=3,
                    bytes_in=1000, bytes_out=50_000, window_s=10.0),
        ServiceStat("db", connections=0, good=0, denied=0, caller_failures=2,
                    bytes_in=0, bytes_out=0, window_s=10.0),
    ]  # fmt: skip
    api = stats[0]
    assert api.success == 0.95 and api.rate(api.connections) == 10.0
    assert stats[1].success is None


def test_only_the_window_counts_and_a_restarted_agent_counts_from_zero() -> None:
    metrics = AgentMetrics()
    metrics.connections.labels("inbound", "web", "api", "closed").inc(1000)
    before = page(metrics)
    metrics.connections.labels("inbound", "web", "api", "closed").inc(10)
    (api,) = golden(before, page(metrics), window_s=1.0)
    assert api.connections == 10
    restarted = AgentMetrics()
    restarted.connections.labels("inbound", "web", "api", "closed").inc(4)
    (api,) = golden(before, page(restarted), window_s=1.0)
    assert api.connections == 4
    assert golden(before, before, window_s=1.0) == []  # nothing happened


@pytest.mark.parametrize(
    "text",
    [
        "meshd_tcp_connections_total{direction=inbound} 1\n",  # unquoted label value
        'meshd_tcp_connections_total{direction="inbound"} one\n',
        "<html>not metrics</html>\n",
    ],
)
def test_a_page_that_is_not_prometheus_text_is_an_error(text: str) -> None:
    with pytest.raises(MetricsFormatError, match="not Prometheus metrics"):
        parse_metrics("# TYPE meshd_tcp_connections counter\n" + text)
