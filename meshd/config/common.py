"""Sections shared by the agent's and the control plane's files: ``[consul]`` and ``[log]``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from meshd.config import fields
from meshd.config.document import Table

LogLevel = Literal["debug", "info", "warning", "error"]

DEFAULT_KV_PREFIX = "meshd/"


@dataclass(frozen=True)
class ConsulConfig:
    """How to reach Consul.

    Attributes:
        address: ``http(s)://host:port`` of the local Consul agent, or None when the file
            does not say: then ``CONSUL_HTTP_ADDR``, else ``http://127.0.0.1:8500``.
        token_file: file holding the ACL token (never the token itself), or None.
        ca_file: CA bundle to verify an https Consul with, or None for the system store.
        kv_prefix: the KV folder meshd owns, ending in ``/``.
    """

    address: str | None = None
    token_file: Path | None = None
    ca_file: Path | None = None
    kv_prefix: str = DEFAULT_KV_PREFIX


@dataclass(frozen=True)
class LogConfig:
    """Logging.

    Attributes:
        level: the least severe level written.
    """

    level: LogLevel = "info"


def _consul_address(value: object) -> str:
    # Like CONSUL_HTTP_ADDR, a bare "host:port" means plain http.
    if isinstance(value, str) and "://" not in value:
        value = f"http://{value}"
    return fields.url("http", "https", require_port=False)(value)


# A segment is never '.' or '..': Consul's HTTP router would redirect or misread a key
# under it (meshd.consul.model.check_key refuses such keys at run time).
_KV_SEGMENT = r"(?!\.\.?(?:/|\Z))[A-Za-z0-9_.-]+"
_kv_prefix = fields.matching(
    rf"{_KV_SEGMENT}(?:/{_KV_SEGMENT})*/?",
    "a KV folder like 'meshd/' (letters, digits, '_', '.', '-', separated by '/'; no empty,"
    " '.' or '..' segment)",
)


def parse_consul(table: Table) -> ConsulConfig:
    """Initialize the ``[consul]`` section.

    Args:
        table: the section.

    Returns:
        The validated section.

    Raises:
        ConfigError: an unknown key or an invalid value.
    """
    table.only("address", "token_file", "ca_file", "kv_prefix")
    file_path = fields.path(table.base)
    prefix = table.get("kv_prefix", _kv_prefix, DEFAULT_KV_PREFIX)
    return ConsulConfig(
        address=table.get("address", _consul_address, None),
        token_file=table.get("token_file", file_path, None),
        ca_file=table.get("ca_file", file_path, None),
        kv_prefix=prefix if prefix.endswith("/") else prefix + "/",
    )


def parse_log(table: Table) -> LogConfig:
    """Initialize the ``[log]`` section.

    Args:
        table: the section.

    Returns:
        The validated section.

    Raises:
        ConfigError: an unknown key or an invalid value.
    """
    table.only("level")
    return LogConfig(level=table.get("level", fields.choice(*get_args(LogLevel)), "info"))
