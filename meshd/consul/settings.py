"""How to reach Consul: address, ACL token and TLS files, resolved once at the edge.

:meth:`ConsulSettings.from_env` reads the same environment variables as the ``consul`` CLI,
so operators configure meshd exactly like their other Consul tools. The token never appears
in ``repr``/``str`` (and so never in logs or error messages).
"""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from meshd.config import ConfigError, ConsulConfig
from meshd.consul.errors import ConsulSettingsError
from meshd.keyfile import KeyFileError, read_secret

DEFAULT_ADDRESS = "http://127.0.0.1:8500"
# Consul's documented default ports when an address names none.
_DEFAULT_PORTS = {"http": 8500, "https": 8501}
_TRUE = frozenset({"1", "t", "true", "yes", "on"})
_FALSE = frozenset({"0", "f", "false", "no", "off"})


@dataclass(frozen=True)
class ConsulSettings:
    """Validated, normalised connection settings.

    Attributes:
        address: ``http[s]://host:port``; ``host:port`` is accepted and means http.
        token: ACL token sent as ``X-Consul-Token``; never shown in repr.
        ca_file: PEM bundle that verifies Consul's HTTPS certificate (``CONSUL_CACERT``).
        ca_path: directory of PEM CA certificates (``CONSUL_CAPATH``).
        client_cert: client certificate for HTTPS with verify_incoming (``CONSUL_CLIENT_CERT``).
        client_key: its private key (``CONSUL_CLIENT_KEY``).
        verify: verify Consul's HTTPS certificate (``CONSUL_HTTP_SSL_VERIFY``).
        timeout_s: deadline of a non-blocking request; blocking ones add their wait.
        datacenter: query this datacenter instead of the local agent's.
    """

    address: str = DEFAULT_ADDRESS
    token: str | None = field(default=None, repr=False)
    ca_file: Path | None = None
    ca_path: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    verify: bool = True
    timeout_s: float = 10.0
    datacenter: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "address", normalise_address(self.address, "address"))
        token = self.token
        if token is not None and not (
            token.isascii() and token.isprintable() and token.split() == [token]
        ):
            # The value itself is a secret: name the problem, never echo the token.
            raise ConsulSettingsError(
                "Consul ACL token: must be non-empty printable ASCII without whitespace"
            )
        if not self.timeout_s > 0:
            raise ConsulSettingsError(f"Consul timeout_s: must be > 0, got {self.timeout_s!r}")
        if (self.client_cert is None) != (self.client_key is None):
            raise ConsulSettingsError(
                "Consul client_cert and client_key: set both or neither "
                "(CONSUL_CLIENT_CERT / CONSUL_CLIENT_KEY)"
            )

    @property
    def scheme(self) -> str:
        """``http`` or ``https``."""
        return self.address.split("://", 1)[0]

    @classmethod
    def from_config(cls, config: ConsulConfig, *, file: str) -> ConsulSettings:
        """The consul CLI's environment, overridden by a ``[consul]`` config section.

        The token comes from ``token_file``, which must be readable by its owner only.

        Args:
            config: the validated ``[consul]`` section.
            file: the config file it came from, named in errors.

        Raises:
            ConfigError: the token file is missing, too open, or empty (never the token).
            ConsulSettingsError: a ``CONSUL_*`` environment variable is malformed.
        """
        settings = cls.from_env()
        token = settings.token
        if config.token_file is not None:
            try:
                token = read_secret(config.token_file).decode("utf-8", "replace").strip()
            except KeyFileError as exc:
                raise ConfigError(file, "consul.token_file", str(exc)) from None
            if not token:
                raise ConfigError(file, "consul.token_file", f"{config.token_file} is empty")
        address = settings.address  # CONSUL_HTTP_ADDR, or the default
        if config.address is not None:
            address = normalise_address(config.address, f"{file}: consul.address")
        return replace(
            settings,
            address=address,
            ca_file=config.ca_file or settings.ca_file,
            token=token,
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ConsulSettings:
        """Build settings from the ``consul`` CLI's environment variables.

        Reads ``CONSUL_HTTP_ADDR``, ``CONSUL_HTTP_TOKEN`` (or ``CONSUL_HTTP_TOKEN_FILE``),
        ``CONSUL_HTTP_SSL``, ``CONSUL_HTTP_SSL_VERIFY``, ``CONSUL_CACERT``, ``CONSUL_CAPATH``,
        ``CONSUL_CLIENT_CERT``, ``CONSUL_CLIENT_KEY``. Unset or empty means the default.

        Args:
            environ: the environment to read; ``os.environ`` when omitted.

        Returns:
            The validated settings.

        Raises:
            ConsulSettingsError: a variable is malformed or the token file is unreadable;
                the message names the variable (never the token).
        """
        env = os.environ if environ is None else environ

        def get(name: str) -> str | None:
            value = env.get(name, "").strip()
            return value or None

        address = normalise_address(get("CONSUL_HTTP_ADDR") or DEFAULT_ADDRESS, "CONSUL_HTTP_ADDR")
        if _flag(get("CONSUL_HTTP_SSL"), "CONSUL_HTTP_SSL", default=False):
            address = "https://" + address.split("://", 1)[1]
        settings = cls(
            address=address,
            token=get("CONSUL_HTTP_TOKEN") or _read_token_file(get("CONSUL_HTTP_TOKEN_FILE")),
            ca_file=_path(get("CONSUL_CACERT")),
            ca_path=_path(get("CONSUL_CAPATH")),
            client_cert=_path(get("CONSUL_CLIENT_CERT")),
            client_key=_path(get("CONSUL_CLIENT_KEY")),
            verify=_flag(get("CONSUL_HTTP_SSL_VERIFY"), "CONSUL_HTTP_SSL_VERIFY", default=True),
        )
        return settings

    def with_token(self, token: str | None) -> ConsulSettings:
        """Return a copy that uses *token* (e.g. from a ``--token-file`` flag)."""
        return replace(self, token=token)


def normalise_address(raw: str, source: str) -> str:
    """Turn ``host:port`` / ``http[s]://host[:port]`` into ``scheme://host:port``.

    Args:
        raw: the address as configured.
        source: what to name in the error (a variable or setting name).

    Returns:
        The normalised address; IPv6 hosts are bracketed.

    Raises:
        ConsulSettingsError: the address is not an http(s) host:port.
    """
    text = raw.strip()
    if "://" not in text:
        text = "http://" + text
    expected = "expected [http[s]://]host:port"
    try:
        parts = urllib.parse.urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise ConsulSettingsError(
            f"{source}: {raw!r} is not an address ({exc}); {expected}"
        ) from exc
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        raise ConsulSettingsError(f"{source}: {raw!r} is not an address; {expected}")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise ConsulSettingsError(f"{source}: {raw!r} must not have a path or credentials")
    host = parts.hostname
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port or _DEFAULT_PORTS[scheme]}"


def _flag(value: str | None, name: str, *, default: bool) -> bool:
    if value is None:
        return default
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise ConsulSettingsError(f"{name}: {value!r} is not a boolean (expected true or false)")


def _path(value: str | None) -> Path | None:
    return None if value is None else Path(value)


def _read_token_file(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        token = Path(value).read_text(encoding="ascii").strip()
    except OSError as exc:
        raise ConsulSettingsError(f"CONSUL_HTTP_TOKEN_FILE: cannot read {value}: {exc}") from exc
    except UnicodeDecodeError:
        # The decoder's message quotes a byte of the secret: say only what is wrong.
        raise ConsulSettingsError(f"CONSUL_HTTP_TOKEN_FILE: {value} is not ASCII") from None
    if not token:
        raise ConsulSettingsError(f"CONSUL_HTTP_TOKEN_FILE: {value} is empty")
    return token
