"""L7 ``Permissions`` of an intention source, parsed strictly.

The shape is Consul's ``service-intentions`` permission:
``{"Action": "allow"|"deny", "HTTP": {"PathExact"|"PathPrefix"|"PathRegex": ..., "Methods": [...],
"Header": [{"Name": ..., "Present"|"Exact"|"Prefix"|"Suffix"|"Regex": ..., "Invert": bool}]}}``.

These are only *parsed* here. Until L7 enforcement exists, :mod:`meshd.intentions.policy`
treats a source that carries permissions as a deny at L4 (see there for why).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from meshd.intentions.schema import (
    Action,
    DocRef,
    check_action,
    check_object,
    check_str,
    type_name,
)

HTTP_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}
)
_HEADER_MATCH_KINDS = ("Present", "Exact", "Prefix", "Suffix", "Regex")
# RFC 9110 token characters, minus "_": proxies disagree on whether x_user and x-user are
# the same header (a classic L7 authorization bypass), so underscores are refused.
_HEADER_NAME_RE = re.compile(r"[!#$%&'*+.^`|~0-9A-Za-z-]+")


@dataclass(frozen=True)
class HeaderMatch:
    """One ``Header`` clause: exactly one of present/exact/prefix/suffix/regex is set."""

    name: str
    kind: str  # one of _HEADER_MATCH_KINDS, as written in the document
    value: str  # "" for Present
    invert: bool = False


@dataclass(frozen=True)
class HTTPMatch:
    """The ``HTTP`` clause of a permission; at most one path matcher is set."""

    path_exact: str | None = None
    path_prefix: str | None = None
    path_regex: str | None = None
    methods: tuple[str, ...] = ()
    headers: tuple[HeaderMatch, ...] = ()


@dataclass(frozen=True)
class Permission:
    """One L7 permission: an action applied to requests matching ``http``."""

    action: Action
    http: HTTPMatch


def parse_permissions(doc: DocRef, field: str, value: Any) -> tuple[Permission, ...]:
    """Parse a source's ``Permissions`` array.

    Raises:
        IntentionError: (via *doc*) anything but a non-empty array of valid permissions.
    """
    if not isinstance(value, list):
        raise doc.fail(field, f"must be an array, got {type_name(value)}")
    if not value:
        raise doc.fail(field, "must not be empty (omit it and set Action instead)")
    return tuple(_parse_permission(doc, f"{field}[{i}]", item) for i, item in enumerate(value))


def _parse_permission(doc: DocRef, field: str, value: Any) -> Permission:
    obj = check_object(doc, field, value, frozenset({"Action", "HTTP"}))
    if "Action" not in obj:
        raise doc.fail(f"{field}.Action", "is required")
    if "HTTP" not in obj:
        raise doc.fail(f"{field}.HTTP", "is required")
    return Permission(
        action=check_action(doc, f"{field}.Action", obj["Action"]),
        http=_parse_http(doc, f"{field}.HTTP", obj["HTTP"]),
    )


def _parse_http(doc: DocRef, field: str, value: Any) -> HTTPMatch:
    allowed = frozenset({"PathExact", "PathPrefix", "PathRegex", "Methods", "Header"})
    obj = check_object(doc, field, value, allowed)
    paths = [name for name in ("PathExact", "PathPrefix", "PathRegex") if name in obj]
    if len(paths) > 1:
        raise doc.fail(field, f"at most one of PathExact, PathPrefix, PathRegex (got {paths})")
    for name in paths:
        path = check_str(doc, f"{field}.{name}", obj[name])
        if name == "PathRegex":
            _check_regex(doc, f"{field}.{name}", path)
        elif not path.startswith("/"):
            raise doc.fail(f"{field}.{name}", f"must start with '/', got {path!r}")
    methods = obj.get("Methods", [])
    if not isinstance(methods, list):
        raise doc.fail(f"{field}.Methods", f"must be an array, got {type_name(methods)}")
    for i, method in enumerate(methods):
        if check_str(doc, f"{field}.Methods[{i}]", method) not in HTTP_METHODS:
            raise doc.fail(f"{field}.Methods[{i}]", f"unknown HTTP method {method!r}")
    headers = obj.get("Header", [])
    if not isinstance(headers, list):
        raise doc.fail(f"{field}.Header", f"must be an array, got {type_name(headers)}")
    if not (paths or methods or headers):
        raise doc.fail(field, "must match on at least one of path, Methods or Header")
    return HTTPMatch(
        path_exact=obj.get("PathExact"),
        path_prefix=obj.get("PathPrefix"),
        path_regex=obj.get("PathRegex"),
        methods=tuple(methods),
        headers=tuple(_parse_header(doc, f"{field}.Header[{i}]", h) for i, h in enumerate(headers)),
    )


def _parse_header(doc: DocRef, field: str, value: Any) -> HeaderMatch:
    obj = check_object(doc, field, value, frozenset({"Name", "Invert", *_HEADER_MATCH_KINDS}))
    if "Name" not in obj:
        raise doc.fail(f"{field}.Name", "is required")
    name = check_str(doc, f"{field}.Name", obj["Name"])
    if not _HEADER_NAME_RE.fullmatch(name):
        raise doc.fail(f"{field}.Name", f"{name!r} is not an HTTP header name")
    kinds = [kind for kind in _HEADER_MATCH_KINDS if kind in obj]
    if len(kinds) != 1:
        raise doc.fail(field, f"exactly one of {', '.join(_HEADER_MATCH_KINDS)} (got {kinds})")
    kind = kinds[0]
    invert = obj.get("Invert", False)
    if not isinstance(invert, bool):
        raise doc.fail(f"{field}.Invert", f"must be a boolean, got {type_name(invert)}")
    if kind == "Present":
        if obj[kind] is not True:
            raise doc.fail(f"{field}.Present", "must be true (use Invert to match absence)")
        return HeaderMatch(name=name, kind=kind, value="", invert=invert)
    text = check_str(doc, f"{field}.{kind}", obj[kind], allow_empty=kind == "Exact")
    if kind == "Regex":
        _check_regex(doc, f"{field}.Regex", text)
    return HeaderMatch(name=name, kind=kind, value=text, invert=invert)


def _check_regex(doc: DocRef, field: str, pattern: str) -> None:
    """Refuse patterns that do not compile (Python's ``re``; the L7 matcher must agree)."""
    try:
        re.compile(pattern)
    except re.error as exc:
        raise doc.fail(field, f"is not a valid regular expression: {exc}") from None


def render_permission(permission: Permission) -> dict[str, Any]:
    """Render one permission as the JSON object :func:`parse_permissions` accepts."""
    http: dict[str, Any] = {}
    for name, path in (
        ("PathExact", permission.http.path_exact),
        ("PathPrefix", permission.http.path_prefix),
        ("PathRegex", permission.http.path_regex),
    ):
        if path is not None:
            http[name] = path
    if permission.http.methods:
        http["Methods"] = list(permission.http.methods)
    if permission.http.headers:
        http["Header"] = [_render_header(h) for h in permission.http.headers]
    return {"Action": permission.action.value, "HTTP": http}


def _render_header(header: HeaderMatch) -> dict[str, Any]:
    out: dict[str, Any] = {"Name": header.name}
    out[header.kind] = True if header.kind == "Present" else header.value
    if header.invert:
        out["Invert"] = True
    return out
