"""Golden metrics per service, from the agents' Prometheus counters (sans-IO).

``meshctl stat`` scrapes every agent twice, a window apart, and hands the two sets of
samples here. What a service's own agents count (``direction="inbound"``, destination =
the service) says how it is called: connections, how many of them ended well, bytes each
way, and how many intentions refused. What its callers' agents count (``direction=
"outbound"``) adds the calls that never reached it (no endpoint, upstream failures, no
identity). At L4 a connection is the unit; there is no request latency to report.

A counter that went down between the scrapes (the agent restarted) counts from zero, as
Prometheus' ``rate()`` does.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from meshd.identity import is_label

#: The ``source`` label of a connection with no service identity (refused before one was
#: verified, or a passthrough caller) and the ``destination`` label of one to no mesh
#: service (an address outside the mesh, or none known): the access log has the address.
NOT_A_SERVICE = "?"


def service_label(value: str) -> str:
    """*value* as a ``source`` or ``destination`` label: a service name (or ``anonymous``,
    a plaintext peer) as it is, anything else as :data:`NOT_A_SERVICE`. Addresses carry
    ephemeral ports: as labels they would make a new series per connection."""
    return value if is_label(value) else NOT_A_SERVICE


#: Connection outcomes that are a connection carried to its end (not a failure).
GOOD_OUTCOMES = frozenset({"closed", "idle_timeout"})

#: The families read, and the suffix of the sample that carries each one's value.
_KINDS = {"counter": "_total", "gauge": ""}

Labels = tuple[tuple[str, str], ...]
Samples = Mapping[tuple[str, Labels], float]


class MetricsFormatError(ValueError):
    """An agent's ``/metrics`` could not be read as the Prometheus text format."""


def parse_metrics(text: str) -> dict[tuple[str, Labels], float]:
    """The ``meshd_*`` counter and gauge samples of one ``/metrics`` page, by sample name
    (``…_total`` for a counter) and labels.

    Raises:
        MetricsFormatError: the text is not the Prometheus exposition format.
    """
    samples: dict[tuple[str, Labels], float] = {}
    try:
        for family in text_string_to_metric_families(text):
            if not family.name.startswith("meshd_") or family.type not in _KINDS:
                continue
            for sample in family.samples:
                if sample.name == family.name + _KINDS[family.type]:
                    samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    except (ValueError, TypeError, IndexError) as exc:
        raise MetricsFormatError(f"not Prometheus metrics: {exc}") from None
    return samples


def merge(pages: Iterable[Samples]) -> dict[tuple[str, Labels], float]:
    """The sum of several agents' samples (same name and labels add up)."""
    total: dict[tuple[str, Labels], float] = {}
    for page in pages:
        for key, value in page.items():
            total[key] = total.get(key, 0.0) + value
    return total


@dataclass(frozen=True)
class ServiceStat:
    """One service over the window (counts are increases, rates per second).

    Attributes:
        service: the service, as a destination.
        connections: connections its inbound proxies finished (any outcome).
        good: of those, carried to their end (``closed`` or ``idle_timeout``).
        denied: refused by intentions at its inbound proxies.
        caller_failures: its callers' outbound connections to it that failed (refused, no
            endpoint, upstream failure, reset, error).
        bytes_in: bytes carried to the service.
        bytes_out: bytes carried back to its callers.
        window_s: the window the counts cover.
    """

    service: str
    connections: float
    good: float
    denied: float
    caller_failures: float
    bytes_in: float
    bytes_out: float
    window_s: float

    @property
    def success(self) -> float | None:
        """The share of connections carried to their end (None without connections)."""
        return self.good / self.connections if self.connections else None

    def rate(self, count: float) -> float:
        """*count* per second over the window."""
        return count / self.window_s if self.window_s > 0 else 0.0


def _increase(before: Samples, after: Samples, key: tuple[str, Labels]) -> float:
    now = after.get(key, 0.0)
    then = before.get(key, 0.0)
    return now if now < then else now - then  # a reset counts from zero


def golden(before: Samples, after: Samples, window_s: float) -> list[ServiceStat]:
    """Per destination service, what happened between *before* and *after* (merged
    samples of all agents), sorted by service name. Services with no activity in the
    window are left out."""
    acc: dict[str, dict[str, float]] = {}

    def add(service: str, field: str, value: float) -> None:
        if value:
            acc.setdefault(service, {}).setdefault(field, 0.0)
            acc[service][field] += value

    for key in after:
        name, labels = key
        label = dict(labels)
        value = _increase(before, after, key)
        destination = label.get("destination", "")
        if not value or not is_label(destination):
            continue  # not a mesh service (NOT_A_SERVICE; an older agent wrote its address)
        direction = label.get("direction")
        if name == "meshd_tcp_connections_total" and direction == "inbound":
            add(destination, "connections", value)
            if label.get("outcome") in GOOD_OUTCOMES:
                add(destination, "good", value)
        elif name == "meshd_tcp_connections_total" and direction == "outbound":
            if label.get("outcome") not in GOOD_OUTCOMES | {"passthrough"}:
                add(destination, "caller_failures", value)
        elif name == "meshd_authz_denied_total":
            add(destination, "denied", value)
        elif name == "meshd_tcp_bytes_total" and direction == "inbound":
            way = label.get("way")
            add(destination, "bytes_in" if way == "to_upstream" else "bytes_out", value)
    return [
        ServiceStat(
            service=service,
            connections=f.get("connections", 0.0),
            good=f.get("good", 0.0),
            denied=f.get("denied", 0.0),
            caller_failures=f.get("caller_failures", 0.0),
            bytes_in=f.get("bytes_in", 0.0),
            bytes_out=f.get("bytes_out", 0.0),
            window_s=window_s,
        )
        for service, f in sorted(acc.items())
    ]
