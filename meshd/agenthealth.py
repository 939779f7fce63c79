"""Is one running agent healthy? Read from its ``/metrics`` page (sans-IO).

``meshctl check`` scrapes every agent Consul lists and hands each page here, with the
meshed services Consul lists on the agent's node. What counts:

* ``FAIL``: no snapshot yet (its proxies refuse every connection); an invalid document in
  the snapshot it enforces (it fails closed: denials the operator did not write); a meshed
  service of its node without a certificate, or with an expired one (its inbound proxy
  cannot serve callers).
* ``warn``: a certificate whose renewal is more than :data:`RENEWAL_GRACE_S` overdue (the
  agent renews at 50-70 % of the lifetime and exports when); Consul watches whose latest
  request failed (routing and policy are the last known ones); redirect rules that another
  tool flushed or edited since the agent started (the agent put them back).

Metrics an older agent does not export are not held against it.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from meshd.checks import Check
from meshd.golden import Labels, Samples

CERT_EXPIRY = "meshd_cert_expiry_timestamp_seconds"
CERT_RENEWAL = "meshd_cert_renewal_timestamp_seconds"
SNAPSHOT_VERSION = "meshd_snapshot_version"
CONFIG_ERRORS = "meshd_config_errors"
WATCHES = "meshd_consul_watches"
WATCHES_FAILING = "meshd_consul_watches_failing"
REDIRECT_REPAIRS = "meshd_redirect_repairs_total"
REDIRECT_CHECK_FAILING = "meshd_redirect_check_failing"

#: A renewal this late is reported (one attempt takes seconds; retries back off to minutes).
RENEWAL_GRACE_S = 600.0

#: What an invalid document of each kind does to an agent that enforces it.
_INVALID = {
    "intentions": "{n} invalid intentions document(s) in force: their destinations deny"
    " every caller",
    "mesh": "the mesh config it holds is invalid: the strictest settings are in force"
    " (default deny, strict mTLS)",
    "bundle": "it holds no valid trust bundle, so it can verify no peer: mesh calls fail",
}


def agent_checks(
    name: str,
    samples: Samples,
    *,
    services: Sequence[str],
    now: float,
) -> list[Check]:
    """The checks of one agent, from its parsed ``/metrics`` page.

    Args:
        name: what the report calls the agent (its Consul node, say).
        samples: :func:`meshd.golden.parse_metrics` of its page.
        services: the meshed services Consul lists on its node.
        now: the current Unix time.

    Returns:
        one ``ok`` line when nothing is wrong, else one line per problem.
    """
    found: list[Check] = []

    def fail(detail: str) -> None:
        found.append(Check(name, "FAIL", detail))

    def warn(detail: str) -> None:
        found.append(Check(name, "warn", detail))

    version = _value(samples, SNAPSHOT_VERSION)
    if not version:
        fail("no configuration snapshot yet: its proxies refuse every connection")
    for kind, template in _INVALID.items():
        count = _value(samples, CONFIG_ERRORS, (("kind", kind),))
        if count:
            fail(template.format(n=int(count)))

    expiries = _by_label(samples, CERT_EXPIRY, "service")
    renewals = _by_label(samples, CERT_RENEWAL, "service")
    for service in sorted(set(services) - set(expiries)):
        fail(f"{service}: no certificate: its inbound proxy refuses every caller")
    for service, not_after in sorted(expiries.items()):
        left = not_after - now
        if left <= 0:
            fail(f"{service}: certificate expired at {_utc(not_after)}: callers are refused")
        elif (due := renewals.get(service)) is not None and now - due > RENEWAL_GRACE_S:
            warn(f"{service}: renewal overdue since {_utc(due)}; the certificate expires in"
                 f" {_duration(left)}")  # fmt: skip

    failing = _value(samples, WATCHES_FAILING)
    if failing:
        total = _value(samples, WATCHES)
        of = f" of {int(total)}" if total else ""
        warn(f"{int(failing)}{of} Consul watch(es) failing: it routes and authorizes on the"
             " last data it read")  # fmt: skip
    if _value(samples, REDIRECT_CHECK_FAILING):
        fail("its last check of the redirect rules failed (redirect_check_failed in its log):"
             " if they are gone, this host's traffic bypasses the mesh")  # fmt: skip
    repairs = _value(samples, REDIRECT_REPAIRS)
    if repairs:
        warn(f"its redirect rules were flushed or edited by another tool {int(repairs)}"
             " time(s) since it started (it put them back)")  # fmt: skip

    if found:
        return found
    certs = (
        f"{len(expiries)} certificate(s), the first to expire in"
        f" {_duration(min(expiries.values()) - now)}"
        if expiries
        else "no local service"
    )
    return [Check(name, "ok", f"snapshot {int(version or 0)}, {certs}")]


def _value(samples: Samples, name: str, labels: Labels = ()) -> float | None:
    return samples.get((name, labels))


def _by_label(samples: Samples, name: str, label: str) -> dict[str, float]:
    found = {}
    for (sample, labels), value in samples.items():
        if sample == name:
            found[dict(labels).get(label, "")] = value
    return found


def _utc(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _duration(seconds: float) -> str:
    if seconds >= 2 * 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 120:
        return f"{seconds / 60:.0f} min"
    return f"{max(seconds, 0):.0f} s"
