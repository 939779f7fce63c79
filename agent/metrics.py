"""The agent's Prometheus metrics, in a registry of its own (one per agent instance).

Counters are touched once per connection, never per chunk: the byte pump keeps plain
integers and the proxies add them here when the connection ends.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

_DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30, 120, 600, 3600)


@dataclass
class AgentMetrics:
    """Every metric the agent exports; see docs/agent.md for their meaning."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.connections = Counter(
            "meshd_tcp_connections",
            "Proxied TCP connections by direction, source, destination and outcome.",
            ("direction", "source", "destination", "outcome"),
            registry=r,
        )
        self.bytes = Counter(
            "meshd_tcp_bytes",
            "Bytes proxied, by direction, destination and way (to_upstream|to_downstream).",
            ("direction", "destination", "way"),
            registry=r,
        )
        self.duration = Histogram(
            "meshd_tcp_connection_duration_seconds",
            "Lifetime of proxied connections.",
            ("direction",),
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.tls_failures = Counter(
            "meshd_tls_failures",
            "TLS handshakes or peer verifications that failed, by direction and stage.",
            ("direction", "stage"),
            registry=r,
        )
        self.tls_handshakes = Counter(
            "meshd_tls_handshakes",
            "Completed TLS handshakes by direction and whether a session was resumed (yes|no).",
            ("direction", "resumed"),
            registry=r,
        )
        self.authz_denied = Counter(
            "meshd_authz_denied",
            "Connections refused by intentions, by source and destination.",
            ("source", "destination"),
            registry=r,
        )
        self.plaintext_inbound = Counter(
            "meshd_plaintext_inbound",
            "Plaintext connections into meshed services, by destination and outcome.",
            ("destination", "outcome"),
            registry=r,
        )
        self.connect_retries = Counter(
            "meshd_connect_retries",
            "Outbound connects retried on another endpoint.",
            ("destination",),
            registry=r,
        )
        self.retries_refused = Counter(
            "meshd_connect_retries_refused",
            "Outbound connect retries not made because the destination's retry budget was"
            " spent (20 % of its connections over 10 s, plus 10 per second).",
            ("destination",),
            registry=r,
        )
        self.endpoint_ejections = Counter(
            "meshd_endpoint_ejections",
            "Upstream endpoints ejected after consecutive connect failures (moved to the back"
            " of the attempt order for a while), by destination.",
            ("destination",),
            registry=r,
        )
        self.connections_refused = Counter(
            "meshd_connections_refused",
            "Connections reset on arrival because a connection limit was reached, by"
            " direction and limit: max_connections, max_unverified_per_source,"
            " max_failures_per_source.",
            ("direction", "limit"),
            registry=r,
        )
        self.warm_connections = Counter(
            "meshd_warm_connections",
            "Warm (pre-opened) mTLS connections by outcome: hit, miss, expired, closed_by_peer,"
            " open_failed, peer_without_meshd_1 (outbound); inbound_unused (inbound).",
            ("outcome",),
            registry=r,
        )
        self.warm_idle = Gauge(
            "meshd_warm_connections_idle",
            "Warm outbound connections open and waiting to be used.",
            registry=r,
        )
        self.redirect_repairs = Counter(
            "meshd_redirect_repairs",
            "Times the running agent found its redirect rules flushed or edited by another"
            " tool and put them back.",
            registry=r,
        )
        self.redirect_check_failures = Counter(
            "meshd_redirect_check_failures",
            "Checks of the redirect rules that could not read them or put them back.",
            registry=r,
        )
        self.redirect_check_failing = Gauge(
            "meshd_redirect_check_failing",
            "1 while the last check of the redirect rules failed (they may be missing:"
            " traffic then bypasses the mesh), 0 otherwise.",
            registry=r,
        )
        self.snapshot_version = Gauge(
            "meshd_snapshot_version", "Version of the snapshot in use.", registry=r
        )
        self.snapshot_created = Gauge(
            "meshd_snapshot_created_timestamp_seconds",
            "When the snapshot in use was built (age = now - this).",
            registry=r,
        )
        self.config_errors = Gauge(
            "meshd_config_errors",
            "Invalid documents in the snapshot in use, by kind (they fail closed).",
            ("kind",),
            registry=r,
        )

    def watch_consul(self, statistics: Callable[[], WatchTotals]) -> None:
        """Export the Consul watches' health, read from *statistics* at each scrape."""
        self.registry.register(_ConsulWatchCollector(statistics))


@dataclass(frozen=True)
class WatchTotals:
    """What :class:`_ConsulWatchCollector` exports: failed requests since the start, and
    how many watches there are and how many of them failed their latest request."""

    errors: int
    watches: int
    failing: int


class _ConsulWatchCollector(Collector):
    def __init__(self, statistics: Callable[[], WatchTotals]) -> None:
        self._statistics = statistics

    def collect(self) -> Iterator[Metric]:
        totals = self._statistics()
        yield CounterMetricFamily(
            "meshd_consul_watch_errors",
            "Failed Consul requests of the agent's watches (blocking queries) since it started.",
            value=totals.errors,
        )
        yield GaugeMetricFamily(
            "meshd_consul_watches", "Consul watches the agent runs.", value=totals.watches
        )
        yield GaugeMetricFamily(
            "meshd_consul_watches_failing",
            "Watches whose latest Consul request failed: they hold their last known data.",
            value=totals.failing,
        )
