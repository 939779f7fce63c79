"""Values crossing the Consul seam, and the pure translation to and from Consul's JSON.

Nothing here does I/O. Requests are built from frozen values (:func:`registration_payload`);
responses are checked field by field (``parse_*``), raising :class:`ResponseShapeError` when
Consul's answer is not what the API documents, which the client turns into
:class:`~meshd.consul.errors.ConsulBadResponse` naming the address and path.
"""

from __future__ import annotations

import types
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

CheckKind = Literal["http", "tcp", "ttl"]
HealthStatus = Literal["passing", "warning", "critical"]
_EMPTY: Mapping[str, str] = types.MappingProxyType({})


class ResponseShapeError(ValueError):
    """A Consul response lacks a field or has one of the wrong type."""


def _frozen_map(value: Mapping[str, str]) -> Mapping[str, str]:
    return types.MappingProxyType(dict(value))


@dataclass(frozen=True)
class KVEntry:
    """One KV pair as read from Consul; ``value`` is the raw bytes (empty for a null value)."""

    key: str
    value: bytes
    modify_index: int
    create_index: int = 0
    flags: int = 0
    session: str | None = None


@dataclass(frozen=True)
class CheckDefinition:
    """A health check attached to a service registration.

    Attributes:
        kind: ``http`` (GET ``target`` URL, 2xx passes), ``tcp`` (connect to ``target``
            ``host:port``) or ``ttl`` (passes only while renewed by ``check_pass``).
        target: URL or ``host:port``; empty for ``ttl``.
        interval_s: how often Consul runs http/tcp checks.
        timeout_s: per-run timeout for http/tcp checks (Consul's default when None).
        ttl_s: time to live of a ttl check.
        name: display name (Consul derives one when None).
        check_id: explicit id; by default Consul uses ``service:<service_id>`` (with
            ``:<n>`` appended when a service has several checks).
        deregister_after_s: Consul deregisters the service after it was critical this long.
    """

    kind: CheckKind
    target: str = ""
    interval_s: float = 10.0
    timeout_s: float | None = None
    ttl_s: float | None = None
    name: str | None = None
    check_id: str | None = None
    deregister_after_s: float | None = None

    def __post_init__(self) -> None:
        if self.kind == "ttl":
            if self.ttl_s is None or not self.ttl_s > 0:
                raise ValueError("ttl check: ttl_s must be > 0")
            if self.target:
                raise ValueError(f"ttl check: target must be empty, got {self.target!r}")
        elif self.kind in ("http", "tcp"):
            if not self.interval_s > 0:
                raise ValueError(f"{self.kind} check: interval_s must be > 0")
            _validate_target(self.kind, self.target)
        else:
            raise ValueError(f"check kind: expected http, tcp or ttl, got {self.kind!r}")
        for name in ("timeout_s", "deregister_after_s"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{self.kind} check: {name} must be > 0, got {value!r}")


def _validate_target(kind: str, target: str) -> None:
    try:
        parts = urllib.parse.urlsplit(target if kind == "http" else f"tcp://{target}")
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"{kind} check: target {target!r} is invalid: {exc}") from exc
    if kind == "http" and (parts.scheme not in ("http", "https") or not parts.hostname):
        raise ValueError(f"http check: target {target!r} must be an http(s):// URL")
    if kind == "tcp" and (not parts.hostname or port is None or parts.path):
        raise ValueError(f"tcp check: target {target!r} must be host:port")


@dataclass(frozen=True)
class ServiceRegistration:
    """A service instance registered with the local Consul agent.

    ``service_id`` defaults to ``name`` (Consul's rule); ``tags`` and ``meta`` are copied
    into immutable containers.
    """

    name: str
    service_id: str | None = None
    address: str | None = None
    port: int | None = None
    tags: tuple[str, ...] = ()
    meta: Mapping[str, str] = field(default_factory=lambda: _EMPTY, hash=False)
    checks: tuple[CheckDefinition, ...] = ()

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"service name: {self.name!r} must be non-empty without '/'")
        if self.service_id is not None and (not self.service_id or "/" in self.service_id):
            raise ValueError(f"service id: {self.service_id!r} must be non-empty without '/'")
        if self.port is not None and not 0 < self.port < 65536:
            raise ValueError(f"service {self.name}: port {self.port} is not in 1..65535")
        object.__setattr__(self, "tags", tuple(self.tags))
        object.__setattr__(self, "meta", _frozen_map(self.meta))
        object.__setattr__(self, "checks", tuple(self.checks))

    @property
    def effective_id(self) -> str:
        """The id Consul files the instance under."""
        return self.service_id or self.name


@dataclass(frozen=True)
class ServiceInstance:
    """An instance from the health endpoint; ``address`` falls back to the node's.

    ``status`` is the worst of its checks' (and its node's): ``passing``, ``warning`` or
    ``critical`` (Consul's maintenance mode is a critical check).
    """

    node: str
    address: str
    service_id: str
    service_name: str
    port: int
    tags: tuple[str, ...] = ()
    meta: Mapping[str, str] = field(default_factory=lambda: _EMPTY, hash=False)
    status: HealthStatus = "passing"


@dataclass(frozen=True)
class CatalogNode:
    """A node of the catalog."""

    node: str
    address: str
    datacenter: str = ""


@dataclass(frozen=True)
class CatalogNodeService:
    """A service instance registered on a node, at the address it is reached at."""

    service: str
    service_id: str
    address: str
    port: int


def parse_catalog_node(raw: object) -> tuple[CatalogNodeService, ...]:
    """``/v1/catalog/node/<node>``: the node's services (service address, else the node's)."""
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        raise ResponseShapeError(f"expected a JSON object for the node, got {type(raw).__name__}")
    node_address = _field(_field(raw, "Node", dict), "Address", str)
    services = _field(raw, "Services", dict, optional=True) or {}
    found = (
        CatalogNodeService(
            service=_field(item, "Service", str),
            service_id=_field(item, "ID", str),
            address=_field(item, "Address", str, optional=True) or node_address,
            port=_field(item, "Port", int),
        )
        for item in services.values()
    )
    return tuple(sorted(found, key=lambda s: (s.service, s.service_id)))


def check_key(key: str, *, allow_empty: bool = False) -> None:
    """Refuse KV keys Consul's HTTP router would redirect or misread.

    Raises:
        ValueError: empty (unless *allow_empty*), a leading ``/``, or an empty, ``.`` or
            ``..`` segment inside the key.
    """
    if not key:
        if allow_empty:
            return
        raise ValueError("Consul KV key: must not be empty")
    inner = key[:-1] if key.endswith("/") else key
    if key.startswith("/") or any(part in ("", ".", "..") for part in inner.split("/")):
        raise ValueError(
            f"Consul KV key {key!r}: no leading '/', and no empty, '.' or '..' segments"
        )


def kv_folder(prefix: str) -> str:
    """The KV folder an operator names (``--prefix meshd/``), as keys are built from it.

    A leading ``/`` is dropped, as the consul CLI drops it, and a trailing one added.

    Returns:
        The folder, e.g. ``meshd/``.

    Raises:
        ValueError: empty, or with an empty, ``.`` or ``..`` segment (a key under it would
            be redirected or misread by Consul's HTTP router), saying so in one line.
    """
    folder = prefix.removeprefix("/")
    if not folder:
        raise ValueError(f"KV prefix {prefix!r}: expected a KV folder like 'meshd/'")
    folder = folder if folder.endswith("/") else folder + "/"
    try:
        check_key(folder)
    except ValueError:
        raise ValueError(
            f"KV prefix {prefix!r}: expected a KV folder like 'meshd/', without empty,"
            " '.' or '..' segments"
        ) from None
    return folder


def check_name(kind: str, name: str) -> None:
    """Refuse names that would not reach Consul as themselves in a request path (service
    and node names; service, check and session ids).

    python-consul2 percent-encodes the path (everything but ``/`` and ``:``), and Consul
    takes the rest of the path after the endpoint as the name, so ``a/b``, ``a?b``,
    ``a#b``, ``a%41b`` and ``a b`` are read as themselves (tested against a real Consul;
    Consul accepts such names at registration). What does not survive is what Go's router
    cleans and redirects (and httpx normalises): an empty, ``.`` or ``..`` segment. Such a
    name would read another name, or nothing.

    Raises:
        ValueError: empty, or with an empty, ``.`` or ``..`` segment between ``/``.
    """
    if not name or any(part in ("", ".", "..") for part in name.split("/")):
        raise ValueError(
            f"{kind} {name!r}: cannot be sent in a Consul request path (an empty, '.' or"
            " '..' segment between '/' would address another name)"
        )


def go_duration(seconds: float) -> str:
    """Format seconds as a Go duration string Consul parses (millisecond precision)."""
    return f"{max(1, round(seconds * 1000))}ms"


def check_payload(check: CheckDefinition) -> dict[str, Any]:
    """Consul's ``CheckType`` JSON for *check* (used inside a service registration)."""
    payload: dict[str, Any] = {}
    if check.kind == "ttl":
        payload["TTL"] = go_duration(check.ttl_s or 0)
    else:
        payload["HTTP" if check.kind == "http" else "TCP"] = check.target
        payload["Interval"] = go_duration(check.interval_s)
        if check.timeout_s is not None:
            payload["Timeout"] = go_duration(check.timeout_s)
    if check.name is not None:
        payload["Name"] = check.name
    if check.check_id is not None:
        payload["CheckID"] = check.check_id
    if check.deregister_after_s is not None:
        payload["DeregisterCriticalServiceAfter"] = go_duration(check.deregister_after_s)
    return payload


def registration_payload(registration: ServiceRegistration) -> dict[str, Any]:
    """The body of ``PUT /v1/agent/service/register`` for *registration*.

    Built here rather than with python-consul2's ``register`` because that takes a single
    check and falls back to the legacy ``script`` form Consul rejects.
    """
    payload: dict[str, Any] = {"Name": registration.name, "ID": registration.effective_id}
    if registration.address is not None:
        payload["Address"] = registration.address
    if registration.port is not None:
        payload["Port"] = registration.port
    payload["Tags"] = list(registration.tags)
    payload["Meta"] = dict(registration.meta)
    payload["Checks"] = [check_payload(check) for check in registration.checks]
    return payload


def parse_index(raw: object) -> int:
    """The ``X-Consul-Index`` header value as an int (Consul indexes are uint64)."""
    try:
        index = int(str(raw))
    except ValueError:
        raise ResponseShapeError(f"X-Consul-Index {raw!r} is not an integer") from None
    if index < 0:
        raise ResponseShapeError(f"X-Consul-Index {index} is negative")
    return index


def _field(obj: object, key: str, kind: type[Any], *, optional: bool = False) -> Any:
    if not isinstance(obj, dict):
        raise ResponseShapeError(f"expected a JSON object, got {type(obj).__name__}")
    value = obj.get(key)
    if value is None and optional:
        return None
    # bool is an int in Python, but never a valid Consul number.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ResponseShapeError(f"field {key!r}: expected {kind.__name__}, got {value!r:.80}")
    return value


def parse_kv_entry(raw: object) -> KVEntry:
    """One KV object, with ``Value`` already base64-decoded by python-consul2."""
    value = _field(raw, "Value", bytes, optional=True)
    return KVEntry(
        key=_field(raw, "Key", str),
        value=value or b"",
        modify_index=_field(raw, "ModifyIndex", int),
        create_index=_field(raw, "CreateIndex", int, optional=True) or 0,
        flags=_field(raw, "Flags", int, optional=True) or 0,
        session=_field(raw, "Session", str, optional=True),
    )


def parse_kv_entries(raw: object) -> tuple[KVEntry, ...]:
    """A recursive KV listing (``None`` when nothing matches), sorted by key."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ResponseShapeError(f"expected a JSON list of KV entries, got {type(raw).__name__}")
    return tuple(sorted((parse_kv_entry(item) for item in raw), key=lambda e: e.key))


def _str_tuple(raw: object, what: str) -> tuple[str, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list) or not all(isinstance(item, str) for item in raw):
        raise ResponseShapeError(f"{what}: expected a list of strings, got {raw!r:.80}")
    return tuple(raw)


def _str_map(raw: object, what: str) -> Mapping[str, str]:
    if raw is None:
        return _EMPTY
    if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
        raise ResponseShapeError(f"{what}: expected an object of strings, got {raw!r:.80}")
    return _frozen_map(raw)


def parse_health_service(raw: object) -> tuple[ServiceInstance, ...]:
    """``/v1/health/service/<name>`` entries, sorted by (service id, node)."""
    if not isinstance(raw, list):
        raise ResponseShapeError(f"expected a JSON list of entries, got {type(raw).__name__}")
    instances = []
    for entry in raw:
        node = _field(entry, "Node", dict)
        service = _field(entry, "Service", dict)
        instances.append(
            ServiceInstance(
                node=_field(node, "Node", str),
                address=_field(service, "Address", str) or _field(node, "Address", str),
                service_id=_field(service, "ID", str),
                service_name=_field(service, "Service", str),
                port=_field(service, "Port", int),
                tags=_str_tuple(service.get("Tags"), "Service.Tags"),
                meta=_str_map(service.get("Meta"), "Service.Meta"),
                status=_worst_status(entry.get("Checks")),
            )
        )
    return tuple(sorted(instances, key=lambda i: (i.service_id, i.node)))


_BY_SEVERITY: tuple[HealthStatus, ...] = ("passing", "warning", "critical")


def _worst_status(checks: object) -> HealthStatus:
    """The worst ``Status`` of an entry's ``Checks``; one Consul does not know is critical."""
    if checks is None:
        return "passing"
    if not isinstance(checks, list):
        raise ResponseShapeError(f"Checks: expected a list, got {type(checks).__name__}")
    statuses = (c.get("Status") if isinstance(c, dict) else None for c in checks)
    severities = (_BY_SEVERITY.index(s) if s in _BY_SEVERITY else 2 for s in statuses)
    return _BY_SEVERITY[max(severities, default=0)]


def parse_catalog_services(raw: object) -> Mapping[str, tuple[str, ...]]:
    """``/v1/catalog/services``: service name to its known tags."""
    if not isinstance(raw, dict):
        raise ResponseShapeError(f"expected a JSON object of services, got {type(raw).__name__}")
    return types.MappingProxyType(
        {name: _str_tuple(tags, f"tags of {name}") for name, tags in sorted(raw.items())}
    )


def parse_catalog_nodes(raw: object) -> tuple[CatalogNode, ...]:
    """``/v1/catalog/nodes``, sorted by node name."""
    if not isinstance(raw, list):
        raise ResponseShapeError(f"expected a JSON list of nodes, got {type(raw).__name__}")
    nodes = (
        CatalogNode(
            node=_field(item, "Node", str),
            address=_field(item, "Address", str),
            datacenter=_field(item, "Datacenter", str, optional=True) or "",
        )
        for item in raw
    )
    return tuple(sorted(nodes, key=lambda n: n.node))
