"""``meshctl check``'s judgement of one agent, from its /metrics page (sans-IO).

Pages are the agent's own registry (:class:`agent.metrics.AgentMetrics`), rendered and
parsed as ``meshctl check`` reads them, plus the certifier's two gauges written out.
"""

from __future__ import annotations

from prometheus_client import generate_latest

from agent.metrics import AgentMetrics, WatchTotals
from meshd.agenthealth import RENEWAL_GRACE_S, agent_checks
from meshd.checks import Check, exit_status, render_checks
from meshd.golden import parse_metrics

NOW = 1_800_000_000.0
HOUR = 3600.0
HEALTHY_WATCHES = WatchTotals(errors=0, watches=4, failing=0)


def page(
    *,
    version: int = 7,
    invalid: dict[str, int] | None = None,
    certs: dict[str, tuple[float, float]] | None = None,  # service: (not_after, renewal)
    watches: WatchTotals | None = HEALTHY_WATCHES,
    repairs: int = 0,
    redirect_check_failing: bool = False,
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    metrics = AgentMetrics()
    if version:
        metrics.snapshot_version.set(version)
    for kind in ("intentions", "mesh", "bundle"):
        metrics.config_errors.labels(kind).set((invalid or {}).get(kind, 0))
    if watches is not None:
        metrics.watch_consul(lambda: watches)
    if repairs:
        metrics.redirect_repairs.inc(repairs)
    if redirect_check_failing:
        metrics.redirect_check_failures.inc()
        metrics.redirect_check_failing.set(1)
    text = generate_latest(metrics.registry).decode()
    for service, (not_after, renewal) in (
        certs or {"web": (NOW + 20 * HOUR, NOW + 4 * HOUR)}
    ).items():
        text += (
            "# TYPE meshd_cert_expiry_timestamp_seconds gauge\n"
            f'meshd_cert_expiry_timestamp_seconds{{service="{service}"}} {not_after}\n'
            "# TYPE meshd_cert_renewal_timestamp_seconds gauge\n"
            f'meshd_cert_renewal_timestamp_seconds{{service="{service}"}} {renewal}\n'
        )
    return parse_metrics(text)


def judge(samples: dict, services: tuple[str, ...] = ("web",)) -> list[Check]:
    return agent_checks("agent h1", samples, services=services, now=NOW)


def test_a_healthy_agent_is_one_ok_line() -> None:
    (line,) = judge(page())
    assert line == Check(
        "agent h1", "ok", "snapshot 7, 1 certificate(s), the first to expire in 20.0 h"
    )
    assert exit_status([line]) == 0


def test_an_agent_without_a_snapshot_fails() -> None:
    (line,) = judge(page(version=0))
    assert line.status == "FAIL" and "no configuration snapshot" in line.detail


def test_invalid_documents_in_force_fail_each_with_what_it_denies() -> None:
    lines = judge(page(invalid={"intentions": 2, "mesh": 1, "bundle": 1}))
    assert [c.status for c in lines] == ["FAIL"] * 3
    intentions, mesh, bundle = (c.detail for c in lines)
    assert intentions.startswith("2 invalid intentions document(s)") and "deny every" in intentions
    assert "strictest settings" in mesh
    assert "no valid trust bundle" in bundle


def test_a_meshed_service_without_a_certificate_fails() -> None:
    lines = judge(page(), services=("web", "admin"))
    assert lines == [
        Check("agent h1", "FAIL", "admin: no certificate: its inbound proxy refuses every caller")
    ]


def test_an_expired_certificate_fails_and_an_overdue_renewal_warns() -> None:
    expired = judge(page(certs={"web": (NOW - 1, NOW - 8 * HOUR)}))
    assert [c.status for c in expired] == ["FAIL"]
    assert "certificate expired at 2027-01-15 07:59:59 UTC" in expired[0].detail

    late = judge(page(certs={"web": (NOW + 3 * HOUR, NOW - RENEWAL_GRACE_S - 1)}))
    assert [c.status for c in late] == ["warn"]
    assert "renewal overdue since" in late[0].detail and "expires in 3.0 h" in late[0].detail

    # Within the grace period a renewal is under way, not late.
    (on_time,) = judge(page(certs={"web": (NOW + 3 * HOUR, NOW - RENEWAL_GRACE_S + 5)}))
    assert on_time.status == "ok"


def test_failing_consul_watches_and_repaired_rules_warn_without_failing() -> None:
    lines = judge(page(watches=WatchTotals(errors=9, watches=5, failing=2), repairs=3))
    assert [c.status for c in lines] == ["warn", "warn"]
    assert lines[0].detail.startswith("2 of 5 Consul watch(es) failing")
    assert "3 time(s)" in lines[1].detail
    assert exit_status(lines) == 0
    # Errors alone (a watch that failed once and recovered) are not a finding.
    (ok,) = judge(page(watches=WatchTotals(errors=9, watches=5, failing=0)))
    assert ok.status == "ok"


def test_rules_the_agent_could_not_check_or_put_back_fail() -> None:
    """A failed check may mean the rules are gone and nothing puts them back: the host's
    traffic bypasses the mesh. Only the repairs counter used to show, and only successes."""
    (line,) = judge(page(redirect_check_failing=True))
    assert line.status == "FAIL" and "redirect_check_failed" in line.detail
    assert exit_status([line]) == 1


def test_an_older_agent_without_the_newer_metrics_is_not_held_to_them() -> None:
    (line,) = judge(page(watches=None))
    assert line.status == "ok"


def test_the_report_renders_as_aligned_lines_or_json() -> None:
    checks = [Check("mesh", "ok", "fine"), Check("agent a-long-node", "FAIL", "bad")]
    assert render_checks(checks, "table").splitlines() == [
        "ok    mesh              fine",
        "FAIL  agent a-long-node bad",
    ]
    assert '"status": "FAIL"' in render_checks(checks, "json")
    assert exit_status(checks) == 1
