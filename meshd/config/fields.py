"""Value converters: raw TOML values in, validated Python values out.

A converter is a plain function ``object -> T`` that raises :class:`Invalid` with the
problem (what was expected, what was found). It knows nothing of files or keys; the
:class:`~meshd.config.document.Table` that calls it adds both. List and table converters
put the position into :attr:`Invalid.suffix` so the error names ``ports[2]``.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

from meshd.config.duration import format_duration, parse_duration

T = TypeVar("T")
S = TypeVar("S", bound=str)
Convert = Callable[[object], T]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_HOSTNAME = re.compile(
    r"(?=.{1,253}\Z)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?"
)


class Invalid(ValueError):
    """A raw value is not acceptable.

    Attributes:
        problem: what was expected and what was found.
        suffix: where inside the value, appended to the key (``"[2]"``, ``".version"``).
    """

    def __init__(self, problem: str, *, suffix: str = "") -> None:
        super().__init__(problem)
        self.problem = problem
        self.suffix = suffix


@dataclass(frozen=True)
class HostPort:
    """A host (name or IP address) and a TCP port, written ``host:port`` or ``[v6]:port``."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def show(value: object) -> str:
    """Render a raw value for an error message: short, one line, TOML-ish."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def string(value: object) -> str:
    """Any string, including the empty one."""
    if not isinstance(value, str):
        raise Invalid(f"expected a string, got {show(value)}")
    return value


def boolean(value: object) -> bool:
    """``true`` or ``false``; strings like ``"yes"`` are refused."""
    if not isinstance(value, bool):
        raise Invalid(f"expected true or false, got {show(value)}")
    return value


def integer(low: int, high: int) -> Convert[int]:
    """An integer in ``low..high`` inclusive; booleans and floats are refused."""

    def convert(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise Invalid(f"expected an integer {low}-{high}, got {show(value)}")
        return value

    return convert


port = integer(1, 65535)


def duration(low: float, high: float | None = None) -> Convert[float]:
    """A duration string (see :func:`parse_duration`) within ``low..high`` seconds."""

    def convert(value: object) -> float:
        try:
            seconds = parse_duration(value)  # type: ignore[arg-type]  # checks the type
        except ValueError as exc:
            raise Invalid(str(exc)) from None
        if seconds < low or (high is not None and seconds > high):
            upper = f" and at most {format_duration(high)}" if high is not None else ""
            raise Invalid(f"expected at least {format_duration(low)}{upper}, got {value!r}")
        return seconds

    return convert


def choice(*options: S) -> Convert[S]:
    """One of the given strings, exactly."""

    def convert(value: object) -> S:
        for option in options:
            if value == option and isinstance(value, str):
                return option
        listed = ", ".join(repr(o) for o in options)
        raise Invalid(f"expected one of {listed}, got {show(value)}")

    return convert


def matching(regex: str, what: str) -> Convert[str]:
    """A string matching *regex* completely; *what* describes the form for the error."""
    compiled = re.compile(regex)

    def convert(value: object) -> str:
        if not isinstance(value, str) or not compiled.fullmatch(value):
            raise Invalid(f"expected {what}, got {show(value)}")
        return value

    return convert


def list_of(item: Convert[T]) -> Convert[tuple[T, ...]]:
    """An array whose every element passes *item*; the error names the index."""

    def convert(value: object) -> tuple[T, ...]:
        if not isinstance(value, list):
            raise Invalid(f"expected an array, got {show(value)}")
        result = []
        for index, element in enumerate(value):
            try:
                result.append(item(element))
            except Invalid as exc:
                raise Invalid(exc.problem, suffix=f"[{index}]{exc.suffix}") from None
        return tuple(result)

    return convert


def path(base: Path) -> Convert[Path]:
    """A filesystem path; a relative one is taken relative to *base* (the file's folder)."""

    def convert(value: object) -> Path:
        if not isinstance(value, str) or not value or "\0" in value:
            raise Invalid(f"expected a path, got {show(value)}")
        return base / value

    return convert


def host(value: object) -> str:
    """An IP address or a DNS host name."""
    if isinstance(value, str):
        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            if _HOSTNAME.fullmatch(value):
                return value
    raise Invalid(f"expected an IP address or host name, got {show(value)}")


def host_port(value: object) -> HostPort:
    """``host:port`` or ``[ipv6]:port``."""
    form = "'host:port' like '0.0.0.0:8555' or '[::]:8555'"
    if not isinstance(value, str):
        raise Invalid(f"expected {form}, got {show(value)}")
    match = re.fullmatch(r"\[([^\]]+)\]:(\d+)|([^:\[\]]+):(\d+)", value)
    if match is None:
        raise Invalid(f"expected {form}, got {show(value)}")
    raw_host = match.group(1) or match.group(3)
    try:
        return HostPort(host(raw_host), port(int(match.group(2) or match.group(4))))
    except Invalid:
        raise Invalid(f"expected {form}, got {show(value)}") from None


def url(*schemes: str, require_port: bool) -> Convert[str]:
    """An absolute URL with one of *schemes*, a host, optionally a port, and no path."""
    example = f"{schemes[0]}://host:port" if require_port else f"{schemes[0]}://host[:port]"

    def convert(value: object) -> str:
        expected = f"expected a URL like '{example}', got {show(value)}"
        if not isinstance(value, str):
            raise Invalid(expected)
        try:
            parts = urlsplit(value)
            has_port = parts.port is not None
        except ValueError:
            raise Invalid(expected) from None
        if (
            parts.scheme not in schemes
            or not parts.hostname
            or (require_port and not has_port)
            or parts.path not in ("", "/")
            or parts.query
            or parts.fragment
            or parts.username is not None
        ):
            raise Invalid(expected)
        host(parts.hostname.strip("[]"))
        return f"{parts.scheme}://{parts.netloc}"

    return convert


def network(value: object) -> Network:
    """A CIDR such as ``10.0.0.0/8`` or ``fd00::/8``; a bare address is a /32 or /128."""
    if not isinstance(value, str):
        raise Invalid(f"expected a CIDR like '10.0.0.0/8', got {show(value)}")
    try:
        return ipaddress.ip_network(value)
    except ValueError:
        pass
    try:
        # Host bits set is the usual slip ("10.0.0.1/8"); say what was probably meant.
        meant = ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise Invalid(f"expected a CIDR like '10.0.0.0/8', got {show(value)}") from None
    raise Invalid(f"host bits set in {value!r} (did you mean '{meant}'?)")


#: A user on the host, by name or numeric uid (resolved where the file is used).
user = matching(
    r"[A-Za-z_][A-Za-z0-9_.-]{0,31}|\d{1,10}", "a user name or numeric uid like 'meshd'"
)
