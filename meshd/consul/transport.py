"""python-consul2's ``HTTPClient`` interface, implemented on httpx running natively on trio.

python-consul2 builds each request (path, query, token header, body) and hands us a callback
that decodes the response; we perform the request in the current trio task (no threads) and
translate every failure, from the socket up to the callback, into the
:class:`~meshd.consul.errors.ConsulError` family. Messages name the address, the method and
path (hence the KV key or service) and the cause; headers, and so the token, never appear.

:class:`Endpoints` binds python-consul2's endpoint groups (KV, agent, health, catalog,
session, status) to this transport.

Deadline: ``timeout_s`` for ordinary requests; a blocking query may legitimately take its
``wait`` plus up to wait/16 of jitter Consul adds, so it gets ``timeout_s + wait * 17/16``.
"""

from __future__ import annotations

import re
import ssl
from collections.abc import Callable, Sequence
from typing import Any

import consul.base
import httpx
import trio

from meshd.consul.errors import (
    ConsulACLDenied,
    ConsulBadResponse,
    ConsulError,
    ConsulNotFound,
    ConsulRequestRejected,
    ConsulSettingsError,
    ConsulTimeout,
    ConsulUnreachable,
)
from meshd.consul.settings import ConsulSettings

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_BODY_EXCERPT = 200
Params = Sequence[tuple[str, object]] | dict[str, object] | None
Headers = dict[str, str] | None
Body = str | bytes | None
Callback = Callable[[Any], Any]


def blocking_wait_s(params: Params) -> float:
    """The ``wait`` of a blocking query in *params*, in seconds (0 when not blocking)."""
    items = params.items() if isinstance(params, dict) else (params or ())
    for name, value in items:
        match = _DURATION.match(str(value)) if name == "wait" else None
        if match:
            return float(match.group(1)) * _UNIT_S[match.group(2)]
    return 0.0


def tls_context(settings: ConsulSettings) -> ssl.SSLContext:
    """The TLS context for HTTPS to Consul, from ``CONSUL_CACERT`` and friends.

    Raises:
        ConsulSettingsError: a CA or client certificate file cannot be loaded.
    """
    try:
        context = ssl.create_default_context(cafile=settings.ca_file, capath=settings.ca_path)
    except (OSError, ssl.SSLError) as exc:
        raise ConsulSettingsError(
            f"CONSUL_CACERT/CONSUL_CAPATH ({settings.ca_file or settings.ca_path}): "
            f"cannot load CA certificates: {exc}"
        ) from exc
    if not settings.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if settings.client_cert is not None and settings.client_key is not None:
        try:
            context.load_cert_chain(settings.client_cert, settings.client_key)
        except (OSError, ssl.SSLError) as exc:
            raise ConsulSettingsError(
                f"CONSUL_CLIENT_CERT/CONSUL_CLIENT_KEY ({settings.client_cert}): "
                f"cannot load the client certificate: {exc}"
            ) from exc
    return context


def _printable(text: str) -> str:
    flat = " ".join(text.split())
    clean = "".join(ch if ch.isprintable() else "?" for ch in flat)
    return clean[:_BODY_EXCERPT] + ("..." if len(clean) > _BODY_EXCERPT else "")


def _cause(exc: BaseException) -> str:
    """The most specific description in *exc*'s chain (httpx wraps the OSError/SSLError)."""
    best = type(exc).__name__
    current: BaseException | None = exc
    for _ in range(10):  # bounded: chains are short, but never trust a cycle
        if current is None:
            break
        text = _printable(str(current))
        if text and not isinstance(current, BaseExceptionGroup):
            best = f"{type(current).__name__}: {text}"
        if isinstance(current, BaseExceptionGroup) and current.exceptions:
            current = current.exceptions[0]
        else:
            current = current.__cause__ or current.__context__
    return best


class TrioHTTPClient(consul.base.HTTPClient):  # type: ignore[misc]
    """python-consul2 transport performing each request in the calling trio task."""

    def __init__(self, settings: ConsulSettings, client: httpx.AsyncClient) -> None:
        super().__init__(scheme=settings.scheme, verify=settings.verify)
        # The base class formats host:port itself, which breaks on IPv6; ours is normalised.
        self.base_uri = settings.address
        self._settings = settings
        self._client = client

    async def get(
        self, callback: Callback, path: str, params: Params = None, headers: Headers = None
    ) -> Any:
        """Perform a GET and return ``callback(response)``."""
        return await self._request(callback, "GET", path, params, headers, None)

    async def put(
        self,
        callback: Callback,
        path: str,
        params: Params = None,
        data: Body = "",
        headers: Headers = None,
    ) -> Any:
        """Perform a PUT and return ``callback(response)``."""
        return await self._request(callback, "PUT", path, params, headers, data)

    async def delete(
        self,
        callback: Callback,
        path: str,
        params: Params = None,
        data: Body = "",
        headers: Headers = None,
    ) -> Any:
        """Perform a DELETE and return ``callback(response)``."""
        return await self._request(callback, "DELETE", path, params, headers, data)

    async def post(
        self,
        callback: Callback,
        path: str,
        params: Params = None,
        data: Body = "",
        headers: Headers = None,
    ) -> Any:
        """Perform a POST and return ``callback(response)``."""
        return await self._request(callback, "POST", path, params, headers, data)

    def describe(self, method: str, path: str) -> str:
        """The prefix of every error message: which Consul, which request."""
        return f"Consul {self._settings.address}: {method} {path}"

    async def _request(
        self,
        callback: Callback,
        method: str,
        path: str,
        params: Params,
        headers: Headers,
        data: Body,
    ) -> Any:
        where = self.describe(method, path)
        deadline = self._settings.timeout_s + blocking_wait_s(params) * 17 / 16
        try:
            with trio.fail_after(deadline):
                reply = await self._client.request(
                    method, self.uri(path, params), content=data or None, headers=headers
                )
        except trio.TooSlowError:
            raise ConsulTimeout(f"{where}: no answer within {deadline:g} s") from None
        except httpx.TimeoutException as exc:
            raise ConsulTimeout(f"{where}: {_cause(exc)}") from exc
        except (httpx.TransportError, OSError, ssl.SSLError) as exc:
            raise ConsulUnreachable(f"{where}: {_cause(exc)}") from exc
        response = consul.base.Response(reply.status_code, reply.headers, reply.text, reply.content)
        return _decode(where, callback, response)


def _decode(where: str, callback: Callback, response: Any) -> Any:
    status: int = response.code
    try:
        return callback(response)
    except (consul.base.ACLPermissionDenied, consul.base.ACLDisabled):
        raise ConsulACLDenied(
            f"{where}: ACL denied (HTTP {status}): {_printable(response.body)}; "
            "check CONSUL_HTTP_TOKEN and its policy",
            status=status,
        ) from None
    except consul.base.NotFound:
        raise ConsulNotFound(
            f"{where}: not found (HTTP {status}): {_printable(response.body)}", status=status
        ) from None
    except consul.base.ConsulException:
        raise ConsulRequestRejected(
            f"{where}: HTTP {status}: {_printable(response.body)}", status=status
        ) from None
    except ConsulError:
        raise
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        # python-consul2's decoders fail this way on bad JSON, base64 or a missing index.
        raise ConsulBadResponse(
            f"{where}: undecodable answer (HTTP {status}): {_cause(exc)}"
        ) from exc


class Endpoints(consul.base.Consul):  # type: ignore[misc]
    """python-consul2's endpoint groups bound to our transport and settings.

    ``Consul.__init__`` is deliberately not called: it lets ``CONSUL_HTTP_ADDR`` and
    ``CONSUL_HTTP_TOKEN`` override explicit arguments, and builds helpers (legacy ACL
    tokens, discovery chain) that emit DeprecationWarning on construction.
    """

    def __init__(self, http: TrioHTTPClient, settings: ConsulSettings) -> None:
        self.http = http
        self.token = settings.token
        self.dc = settings.datacenter
        self.scheme = settings.scheme
        self.consistency = "default"
        self.agent = consul.base.Consul.Agent(self)
        self.catalog = consul.base.Consul.Catalog(self)
        self.health = consul.base.Consul.Health(self)
        self.kv = consul.base.Consul.KV(self)
        self.session = consul.base.Consul.Session(self)
        self.status = consul.base.Consul.Status(self)
