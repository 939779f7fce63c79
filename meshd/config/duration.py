"""Durations written the way Consul and Go write them: ``"500ms"``, ``"10s"``, ``"1h30m"``.

A bare number is refused on purpose: ``timeout = 10`` is ambiguous (seconds? ms?), and
the error says which form to use. Parsing goes through :class:`~decimal.Decimal` and
converts to float once, so ``"1m0.5s"`` is exactly ``60.5`` and formatting round-trips.
"""

from __future__ import annotations

import re
from decimal import Decimal

_UNITS = {
    "ms": Decimal("0.001"),
    "s": Decimal(1),
    "m": Decimal(60),
    "h": Decimal(3600),
    "d": Decimal(86400),
}
# "ms" precedes "m" in the alternation so that "5ms" is five milliseconds.
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_WHOLE = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|s|m|h|d))+")

EXPECTED = "a duration with a unit like '500ms', '10s', '5m', '24h' or '1h30m'"


def parse_duration(text: str) -> float:
    """Parse a duration string into seconds.

    Args:
        text: one or more ``<number><unit>`` parts, units ``ms``, ``s``, ``m``, ``h``,
            ``d`` (24 h); numbers are non-negative decimals. No spaces, no sign.

    Returns:
        The total in seconds.

    Raises:
        ValueError: *text* is not of that form (the message names the expected form).
    """
    if not isinstance(text, str) or not _WHOLE.fullmatch(text):
        hint = " (add a unit)" if _is_bare_number(text) else ""
        raise ValueError(f"expected {EXPECTED}, got {text!r}{hint}")
    total = sum(
        (Decimal(number) * _UNITS[unit] for number, unit in _PART.findall(text)),
        Decimal(0),
    )
    return float(total)


def format_duration(seconds: float) -> str:
    """Format seconds, rounded to the millisecond, as :func:`parse_duration` reads them.

    Args:
        seconds: a non-negative number of seconds.

    Returns:
        A canonical string such as ``"500ms"``, ``"10s"``, ``"1h30m"`` or ``"2m0.25s"``.

    Raises:
        ValueError: *seconds* is negative or not finite.
    """
    if not seconds >= 0 or seconds == float("inf"):
        raise ValueError(f"expected a non-negative finite number of seconds, got {seconds!r}")
    millis = round(seconds * 1000)
    if millis < 1000:
        return f"{millis}ms"
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    parts = [f"{hours}h" if hours else "", f"{minutes}m" if minutes else ""]
    if secs or millis:
        fraction = f".{millis:03d}".rstrip("0") if millis else ""
        parts.append(f"{secs}{fraction}s")
    return "".join(parts)


def _is_bare_number(value: object) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int | float):
        return True
    return isinstance(value, str) and re.fullmatch(r"\d+(?:\.\d+)?", value) is not None
