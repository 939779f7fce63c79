"""``/etc/meshd/services.d/*.toml``: one file per local service.

A service name becomes a SPIFFE path segment and a TLS SNI, so it is held to a DNS label:
lowercase letters, digits and ``-``, 1-63 characters, not starting or ending with ``-``.
Limits on meta and checks follow Consul's, so a file that loads also registers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Literal, get_args

from meshd.config import fields
from meshd.config.document import Table, parse_toml, read_toml
from meshd.config.errors import ConfigError

Protocol = Literal["tcp", "http"]
CheckKind = Literal["http", "tcp", "ttl"]

SERVICE_NAME = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
service_name = fields.matching(
    SERVICE_NAME, "a service name (lowercase letters, digits and '-', 1-63 characters)"
)
_service_id = fields.matching(
    r"[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,126}[A-Za-z0-9])?",
    "a service id (letters, digits, '_', '.', '-'; 1-128 characters)",
)
_tag = fields.matching(r"[^\s]{1,255}", "a tag (1-255 characters, no spaces)")
_meta_key = fields.matching(
    r"(?!consul-)[A-Za-z0-9_-]{1,128}",
    "a meta key (letters, digits, '_', '-'; 1-128; not starting with 'consul-')",
)
_http_path = fields.matching(r"/[^\s]*", "a path starting with '/', without spaces")
MAX_META = 64  # Consul refuses more pairs, and values longer than 512 characters
MIN_DEREGISTER_AFTER = 60.0  # Consul's reaper silently rounds anything shorter up


@dataclass(frozen=True)
class CheckConfig:
    """One health check Consul runs against the service. Durations are in seconds.

    Attributes:
        kind: ``http`` (GET path, 2xx passes), ``tcp`` (connect), ``ttl`` (agent reports).
        path: the http check's path; ``""`` for other kinds.
        interval: how often Consul checks (http, tcp).
        timeout: how long one check may take (http, tcp).
        ttl: how long a ttl check passes after each report; 0 for other kinds.
        deregister_after: remove the service after critical this long, or None never.
    """

    kind: CheckKind = "tcp"
    path: str = ""
    interval: float = 10.0
    timeout: float = 2.0
    ttl: float = 0.0
    deregister_after: float | None = None


@dataclass(frozen=True)
class ServiceConfig:
    """One local service: its registration in Consul and what the mesh needs of it.

    Attributes:
        name: the service name (DNS label); the SPIFFE ID and SNI use it.
        id: the Consul service id, unique on this host.
        port: where the application listens.
        address: where the application listens; ``""`` means the agent's address.
        protocol: ``tcp`` (L4 proxying) or ``http`` (L7).
        tags: Consul tags.
        meta: Consul service meta (read-only mapping; excluded from the hash).
        upstreams: names of the services this application calls.
        user: the user (name or uid) the application's processes run as; ``""`` for not
            said. When any service of a host says, an outbound connection gets the identity
            of the service whose user opened it (docs/adr/006).
        checks: health checks; a tcp check on the port unless the file says otherwise.
        source: the file this came from (not compared).
    """

    name: str
    port: int
    id: str = ""
    address: str = ""
    protocol: Protocol = "tcp"
    tags: tuple[str, ...] = ()
    meta: MappingProxyType[str, str] = field(
        default_factory=lambda: MappingProxyType({}), hash=False
    )
    upstreams: tuple[str, ...] = ()
    user: str = ""
    checks: tuple[CheckConfig, ...] = (CheckConfig(),)
    source: Path | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not self.id:
            object.__setattr__(self, "id", self.name)


def load_service_file(path: str | Path) -> ServiceConfig:
    """Read and validate one service file.

    Args:
        path: the file; errors name it as given.

    Returns:
        The service, with :attr:`ServiceConfig.source` set to *path*.

    Raises:
        ConfigError: the file is missing, unreadable, not TOML, or holds an invalid value.
    """
    return _service(read_toml(path), Path(path))


def parse_service_config(text: str, *, file: str = "service.toml") -> ServiceConfig:
    """Validate one service file given as text.

    Args:
        text: the TOML document.
        file: how to name the document in errors.

    Returns:
        The initialized configuration.

    Raises:
        ConfigError: as :func:`load_service_file`.
    """
    return _service(parse_toml(text, file=file, base=Path.cwd()), None)


def load_service_dir(
    directory: str | Path, *, missing_ok: bool = False
) -> tuple[ServiceConfig, ...]:
    """Read every ``*.toml`` file of *directory* (not recursing; dot-files are skipped).

    Args:
        directory: usually ``/etc/meshd/services.d``.
        missing_ok: a missing directory yields no services instead of an error.

    Returns:
        The services, sorted by id.

    Raises:
        ConfigError: the directory is missing (unless *missing_ok*) or unreadable, a file
            is invalid, or two files declare the same service id (naming both files).
    """
    folder = Path(directory)
    try:
        entries = sorted(folder.iterdir())
    except FileNotFoundError:
        if missing_ok:
            return ()
        raise ConfigError(str(directory), "", "directory not found") from None
    except NotADirectoryError:
        raise ConfigError(str(directory), "", "not a directory") from None
    except OSError as exc:
        raise ConfigError(str(directory), "", f"cannot list: {exc.strerror or exc}") from None
    # Editors leave ".web.toml.swp" and ".#web.toml" behind; those are not services.
    files = [p for p in entries if p.suffix == ".toml" and not p.name.startswith(".")]
    by_id: dict[str, ServiceConfig] = {}
    for file in files:
        if not file.is_file():
            continue
        service = load_service_file(file)
        if service.id in by_id:
            first = by_id[service.id].source
            problem = f"duplicate service id {service.id!r}, also declared in {first}"
            raise ConfigError(str(file), "service.id", problem)
        by_id[service.id] = service
    return tuple(by_id[key] for key in sorted(by_id))


def _service(root: Table, source: Path | None) -> ServiceConfig:
    root.only("service")
    if "service" not in root.data:
        raise root.error("service", "required table is missing")
    table = root.table("service")
    table.only(
        "name", "id", "port", "address", "protocol", "tags", "meta", "upstreams", "user", "checks"
    )
    name = table.require("name", service_name)
    checks = table.tables("checks")
    return ServiceConfig(
        name=name,
        id=table.get("id", _service_id, name),
        port=table.require("port", fields.port),
        address=table.get("address", _address, ""),
        protocol=table.get("protocol", fields.choice(*get_args(Protocol)), "tcp"),
        tags=table.get("tags", fields.list_of(_tag), ()),
        meta=table.get("meta", _meta, MappingProxyType({})),
        upstreams=table.get("upstreams", _upstreams, ()),
        user=table.get("user", fields.user, ""),
        checks=(CheckConfig(),) if checks is None else tuple(_check(t) for t in checks),
        source=source,
    )


def _address(value: object) -> str:
    return "" if value == "" else fields.host(value)


def _upstreams(value: object) -> tuple[str, ...]:
    names = fields.list_of(service_name)(value)
    for index, name in enumerate(names):
        if name in names[:index]:
            raise fields.Invalid(f"duplicate upstream {name!r}", suffix=f"[{index}]")
    return names


def _meta(value: object) -> MappingProxyType[str, str]:
    if not isinstance(value, dict):
        raise fields.Invalid(f"expected a table of strings, got {fields.show(value)}")
    if len(value) > MAX_META:
        raise fields.Invalid(f"expected at most {MAX_META} pairs, got {len(value)}")
    result = {}
    for key, item in value.items():
        try:
            _meta_key(key)
        except fields.Invalid as exc:
            raise fields.Invalid(exc.problem, suffix=f".{key}") from None
        if not isinstance(item, str) or len(item) > 512:
            problem = f"expected a string of at most 512 characters, got {fields.show(item)}"
            raise fields.Invalid(problem, suffix=f".{key}")
        result[key] = item
    return MappingProxyType(result)


def _check(table: Table) -> CheckConfig:
    table.only("kind", "path", "interval", "timeout", "ttl", "deregister_after")
    kind = table.require("kind", fields.choice(*get_args(CheckKind)))
    # Keys that do not apply to the kind are errors, not silently ignored: an operator who
    # wrote `path` on a tcp check believes the path is being checked.
    only_for = {"path": ("http",), "interval": ("http", "tcp"), "timeout": ("http", "tcp")}
    only_for["ttl"] = ("ttl",)
    for key, kinds in only_for.items():
        if key in table.data and kind not in kinds:
            raise table.error(key, f"not allowed on a {kind} check (only on {'/'.join(kinds)})")
    if kind == "http":
        table.require("path", _http_path)
    default = CheckConfig()
    return CheckConfig(
        kind=kind,
        path=table.get("path", _http_path, ""),
        interval=table.get("interval", fields.duration(1, 24 * 3600), default.interval),
        timeout=table.get("timeout", fields.duration(0.001, 300), default.timeout),
        ttl=table.require("ttl", fields.duration(1)) if kind == "ttl" else 0.0,
        deregister_after=table.get("deregister_after", fields.duration(MIN_DEREGISTER_AFTER), None),
    )
