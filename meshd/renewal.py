"""When to renew a certificate and how long to sleep: pure arithmetic on wall-clock times.

Renewal is driven by the certificate's own NotBefore/NotAfter read against the wall clock,
never by a timer computed once at issuance: a monotonic timer does not advance while the
host is suspended and knows nothing of clock steps (Istio #38081), so the certifier sleeps
in short bounded steps and re-reads the wall clock after every one (:func:`next_check`).
"""

from __future__ import annotations

import enum

RENEW_FROM = 0.5  # fraction of the lifetime at which renewal may start
RENEW_SPREAD = 0.2  # ... plus up to this much more, chosen by jitter (50-70 %)


class Phase(enum.Enum):
    """Where a certificate is in its life at a given wall-clock time."""

    FRESH = "fresh"  # serve it, nothing to do
    RENEW = "renew"  # serve it, and renew it now
    EXPIRED = "expired"  # stop presenting it


def renew_at(not_before: float, not_after: float, jitter_fraction: float) -> float:
    """The wall-clock time at which to renew: 50-70 % into the lifetime.

    Args:
        not_before: the certificate's NotBefore (Unix time).
        not_after: its NotAfter (Unix time).
        jitter_fraction: in [0, 1]; spreads a fleet's renewals over 20 % of the lifetime.

    Returns:
        Unix time; ``not_before`` when the lifetime is not positive.

    Raises:
        ValueError: *jitter_fraction* outside [0, 1].
    """
    if not 0.0 <= jitter_fraction <= 1.0:
        raise ValueError(f"jitter_fraction must be in [0, 1], got {jitter_fraction!r}")
    lifetime = max(0.0, not_after - not_before)
    return not_before + lifetime * (RENEW_FROM + RENEW_SPREAD * jitter_fraction)


def phase(now: float, renew_time: float, not_after: float) -> Phase:
    """Classify *now* against the renewal time and expiry (NotAfter is exclusive here)."""
    if now >= not_after:
        return Phase.EXPIRED
    if now >= renew_time:
        return Phase.RENEW
    return Phase.FRESH


def next_check(now: float, wake_at: float, *, max_step: float) -> float:
    """Seconds to sleep before looking at the wall clock again.

    Args:
        now: the wall clock now.
        wake_at: the wall-clock time something is due (renewal, retry, expiry).
        max_step: the longest single sleep, so a clock step or a suspension is noticed
            within this many seconds of (monotonic) run time.

    Returns:
        A value in ``[0, max_step]``.
    """
    return min(max_step, max(0.0, wake_at - now))


def backoff(attempt: int, *, base: float, cap: float, jitter_fraction: float) -> float:
    """Capped exponential back-off with "equal jitter" for retry number *attempt* (0-based).

    Args:
        attempt: how many attempts failed before this wait (>= 0).
        base: the first delay.
        cap: the largest delay.
        jitter_fraction: in [0, 1]; the delay is ``d/2 + d/2 * jitter_fraction``.

    Returns:
        Seconds, in ``[min(base, cap) / 2, cap]``.
    """
    if attempt < 0 or not 0.0 <= jitter_fraction <= 1.0:
        raise ValueError("backoff: attempt must be >= 0 and jitter_fraction in [0, 1]")
    delay = min(cap, base * 2.0 ** min(attempt, 62))
    return delay / 2 + delay / 2 * jitter_fraction
