"""The Consul client every other part of meshd uses: :func:`open_consul` / :class:`ConsulClient`.

python-consul2's endpoint classes build the requests; :class:`~meshd.consul.transport.
TrioHTTPClient` performs them on trio; this module validates arguments, parses answers into
frozen values (:mod:`meshd.consul.model`) and exposes only the HTTP API that both Consul 1.8
and current Consul have: KV, agent service/check registration, health, catalog, sessions.

Read methods take ``index`` and ``wait_s``: with ``index > 0`` the call is a Consul blocking
query that returns when the result's index passes ``index`` or after about ``wait_s``.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any, Literal, TypeVar

import consul.base
import httpx

from meshd.consul.errors import ConsulBadResponse
from meshd.consul.model import (
    CatalogNode,
    CatalogNodeService,
    KVEntry,
    ResponseShapeError,
    ServiceInstance,
    ServiceRegistration,
    check_key,
    check_name,
    go_duration,
    parse_catalog_node,
    parse_catalog_nodes,
    parse_catalog_services,
    parse_health_service,
    parse_index,
    parse_kv_entries,
    parse_kv_entry,
    registration_payload,
)
from meshd.consul.settings import ConsulSettings
from meshd.consul.transport import Endpoints, TrioHTTPClient, tls_context

T = TypeVar("T")
DEFAULT_WAIT_S = 60.0
MAX_WAIT_S = 600.0  # Consul caps blocking queries at 10 minutes.
_SESSION_TTL_RANGE = (10.0, 86400.0)


@asynccontextmanager
async def open_consul(settings: ConsulSettings) -> AsyncIterator[ConsulClient]:
    """Open a client; its HTTP connections close when the block exits.

    Opening performs no request: an unreachable Consul shows on the first call.

    Args:
        settings: where and how to reach Consul.

    Yields:
        The client.

    Raises:
        ConsulSettingsError: the TLS files in *settings* cannot be loaded.
    """
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=32)
    # The transport puts a deadline on each whole request; httpx only bounds connecting,
    # because a blocking query legitimately reads nothing for minutes.
    timeout = httpx.Timeout(connect=settings.timeout_s, read=None, write=None, pool=None)
    # trust_env=False: HTTP(S)_PROXY or SSL_CERT_FILE must not redirect or re-trust our
    # Consul traffic.
    async with httpx.AsyncClient(
        verify=tls_context(settings), timeout=timeout, trust_env=False, limits=limits
    ) as http:
        yield ConsulClient(settings, TrioHTTPClient(settings, http))


class ConsulClient:
    """Typed, trio-native access to one Consul agent's HTTP API. Use :func:`open_consul`."""

    def __init__(self, settings: ConsulSettings, http: TrioHTTPClient) -> None:
        self._settings = settings
        self._http = http
        self._api = Endpoints(http, settings)

    @property
    def settings(self) -> ConsulSettings:
        """The settings this client was opened with."""
        return self._settings

    def _parse(self, method: str, path: str, parse: Callable[[], T]) -> T:
        try:
            return parse()
        except ResponseShapeError as exc:
            where = self._http.describe(method, path)
            raise ConsulBadResponse(f"{where}: unexpected answer: {exc}") from exc

    @staticmethod
    def _blocking(index: int, wait_s: float | None) -> dict[str, Any]:
        if index < 0:
            raise ValueError(f"blocking query index must be >= 0, got {index}")
        if not index:
            return {}
        wait = DEFAULT_WAIT_S if wait_s is None else min(max(wait_s, 0.001), MAX_WAIT_S)
        return {"index": index, "wait": go_duration(wait)}

    def _headers(self) -> dict[str, str]:
        return {"X-Consul-Token": self._settings.token} if self._settings.token else {}

    # -- KV ---------------------------------------------------------------------------

    async def kv_get(
        self, key: str, *, index: int = 0, wait_s: float | None = None
    ) -> tuple[int, KVEntry | None]:
        """Read one key.

        Args:
            key: the key, without a leading ``/``.
            index: 0 for an immediate read; else block until the key's index passes it.
            wait_s: longest block (default 60 s, at most 600 s).

        Returns:
            ``(index, entry)``; entry is None when the key does not exist.

        Raises:
            ConsulError: any failure, naming the address, key and cause.
        """
        check_key(key)
        raw_index, raw = await self._api.kv.get(key, **self._blocking(index, wait_s))
        return self._parse(
            "GET",
            f"/v1/kv/{key}",
            lambda: (parse_index(raw_index), None if raw is None else parse_kv_entry(raw)),
        )

    async def kv_list(
        self, prefix: str, *, index: int = 0, wait_s: float | None = None
    ) -> tuple[int, tuple[KVEntry, ...]]:
        """Read every key under *prefix* (recursively), sorted by key.

        Returns:
            ``(index, entries)``; entries is empty when nothing matches.

        Raises:
            ConsulError: any failure, naming the address, prefix and cause.
        """
        check_key(prefix, allow_empty=True)
        raw_index, raw = await self._api.kv.get(
            prefix, recurse=True, **self._blocking(index, wait_s)
        )
        return self._parse(
            "GET", f"/v1/kv/{prefix}", lambda: (parse_index(raw_index), parse_kv_entries(raw))
        )

    async def kv_put(
        self,
        key: str,
        value: bytes,
        *,
        cas: int | None = None,
        flags: int | None = None,
        acquire: str | None = None,
        release: str | None = None,
    ) -> bool:
        """Write a key, optionally as a check-and-set or a session lock operation.

        Args:
            key: the key.
            value: the bytes to store.
            cas: 0 writes only if the key is absent; N only if its ModifyIndex is N.
            flags: opaque uint64 stored with the key.
            acquire: session id taking the key's lock with the write.
            release: session id releasing the key's lock with the write.

        Returns:
            True if written; False if the check-and-set or lock acquisition lost.

        Raises:
            ConsulError: any failure, naming the address, key and cause.
        """
        check_key(key)
        if not isinstance(value, bytes):
            raise TypeError(f"Consul KV value for {key!r} must be bytes")
        result = await self._api.kv.put(
            key, value, cas=cas, flags=flags, acquire=acquire, release=release
        )
        return self._expect_bool("PUT", f"/v1/kv/{key}", result)

    async def kv_delete(self, key: str, *, cas: int | None = None, recurse: bool = False) -> bool:
        """Delete a key, or with ``recurse`` every key under the prefix *key*.

        Args:
            key: the key or prefix (a recursive delete of ``""`` is refused).
            cas: delete only if the key's ModifyIndex is this (must be > 0).
            recurse: delete the whole prefix.

        Returns:
            True if Consul applied it (a missing key counts as deleted); False if cas lost.

        Raises:
            ConsulError: any failure, naming the address, key and cause.
        """
        check_key(key)
        if cas is not None and cas <= 0:
            raise ValueError(f"kv_delete {key!r}: cas must be > 0 (Consul ignores cas=0)")
        result = await self._api.kv.delete(key, recurse=recurse or None, cas=cas)
        return self._expect_bool("DELETE", f"/v1/kv/{key}", result)

    def _expect_bool(self, method: str, path: str, result: object) -> bool:
        if not isinstance(result, bool):
            where = self._http.describe(method, path)
            raise ConsulBadResponse(f"{where}: expected true or false, got {result!r:.80}")
        return result

    # -- agent: services and checks ------------------------------------------------------

    async def service_register(self, registration: ServiceRegistration) -> None:
        """Register (or re-register, replacing its checks) a service with the local agent.

        Raises:
            ConsulError: any failure, e.g. Consul rejecting a check (HTTP 400).
        """
        path = "/v1/agent/service/register"
        await self._http.put(
            consul.base.CB.bool(),
            path,
            # Without it a re-registration keeps checks the new definition dropped.
            params=[("replace-existing-checks", "true")],
            headers=self._headers(),
            data=json.dumps(registration_payload(registration)),
        )

    async def service_deregister(self, service_id: str) -> None:
        """Remove a service (and its checks) from the local agent.

        Raises:
            ConsulError: any failure; an unknown id is a 404 (:class:`ConsulNotFound`).
        """
        check_name("service id", service_id)
        await self._api.agent.service.deregister(service_id)

    async def check_pass(self, check_id: str, note: str | None = None) -> None:
        """Mark a TTL check passing and restart its TTL.

        Raises:
            ConsulError: any failure, e.g. an unknown check id (HTTP 404 or 500).
        """
        check_name("check id", check_id)
        await self._api.agent.check.ttl_pass(check_id, notes=note)

    async def check_fail(self, check_id: str, note: str | None = None) -> None:
        """Mark a TTL check critical.

        Raises:
            ConsulError: any failure, e.g. an unknown check id.
        """
        check_name("check id", check_id)
        await self._api.agent.check.ttl_fail(check_id, notes=note)

    # -- health and catalog ---------------------------------------------------------------

    async def health_service(
        self,
        name: str,
        *,
        index: int = 0,
        wait_s: float | None = None,
        passing_only: bool = True,
    ) -> tuple[int, tuple[ServiceInstance, ...]]:
        """Instances of *name* whose checks (and node's) all pass; every instance, each
        with its ``status``, when *passing_only* is false.

        Tags are not filtered server-side: python-consul2 turns a tag list into a query
        Consul matches against nothing. Filter ``instance.tags`` instead.

        Returns:
            ``(index, instances)`` sorted by (service id, node).

        Raises:
            ConsulError: any failure, naming the address, service and cause.
        """
        check_name("service name", name)
        raw_index, raw = await self._api.health.service(
            name, passing=passing_only, **self._blocking(index, wait_s)
        )
        return self._parse(
            "GET",
            f"/v1/health/service/{name}",
            lambda: (parse_index(raw_index), parse_health_service(raw)),
        )

    async def catalog_services(
        self, *, index: int = 0, wait_s: float | None = None
    ) -> tuple[int, Mapping[str, tuple[str, ...]]]:
        """Every service name in the catalog with the union of its tags.

        Raises:
            ConsulError: any failure.
        """
        raw_index, raw = await self._api.catalog.services(**self._blocking(index, wait_s))
        return self._parse(
            "GET",
            "/v1/catalog/services",
            lambda: (parse_index(raw_index), parse_catalog_services(raw)),
        )

    async def catalog_nodes(
        self, *, address: str | None = None, index: int = 0, wait_s: float | None = None
    ) -> tuple[int, tuple[CatalogNode, ...]]:
        """Nodes in the catalog, sorted by name; with *address*, only the node(s) there.

        The address filter runs in Consul (``?filter=Address == "..."``, Consul >= 1.5), so
        finding which node owns an IP is one small read, never a catalog scan.

        Raises:
            ConsulError: any failure.
            ValueError: *address* is not an IP address.
        """
        path = "/v1/catalog/nodes"
        if address is None:
            raw_index, raw = await self._api.catalog.nodes(**self._blocking(index, wait_s))
        else:
            params = [("filter", f'Address == "{ipaddress.ip_address(address)}"')]
            params += list(self._blocking(index, wait_s).items())
            raw_index, raw = await self._http.get(
                consul.base.CB.json(index=True), path, params=params, headers=self._headers()
            )
        return self._parse("GET", path, lambda: (parse_index(raw_index), parse_catalog_nodes(raw)))

    async def catalog_node_services(self, node: str) -> tuple[CatalogNodeService, ...]:
        """The service instances registered on *node* (empty if the node is unknown).

        Raises:
            ConsulError: any failure.
        """
        check_name("node name", node)
        path = f"/v1/catalog/node/{node}"
        _, raw = await self._http.get(
            consul.base.CB.json(index=True), path, headers=self._headers()
        )
        return self._parse("GET", path, lambda: parse_catalog_node(raw))

    # -- sessions (for leader locks) ---------------------------------------------------------

    async def session_create(
        self,
        name: str,
        *,
        ttl_s: float = 15.0,
        behavior: Literal["release", "delete"] = "release",
        lock_delay_s: int = 15,
    ) -> str:
        """Create a session bound to this node's health and a TTL.

        Args:
            name: human-readable name.
            ttl_s: seconds (10..86400) the session lives without :meth:`session_renew`.
            behavior: what happens to held locks when it is invalidated.
            lock_delay_s: seconds a released lock cannot be re-acquired.

        Returns:
            The session id.

        Raises:
            ConsulError: any failure.
        """
        low, high = _SESSION_TTL_RANGE
        if not low <= ttl_s <= high:
            raise ValueError(f"session {name!r}: ttl_s must be in {low:g}..{high:g}, got {ttl_s}")
        if behavior not in ("release", "delete") or lock_delay_s < 0:
            raise ValueError(f"session {name!r}: bad behavior or lock_delay_s")
        # python-consul2 formats the ttl as "<n>s"; whole seconds keep it a valid duration.
        session_id = await self._api.session.create(
            name=name, ttl=round(ttl_s), behavior=behavior, lock_delay=lock_delay_s
        )
        if not isinstance(session_id, str) or not session_id:
            where = self._http.describe("PUT", "/v1/session/create")
            raise ConsulBadResponse(f"{where}: no session ID in the answer")
        return session_id

    async def session_renew(self, session_id: str) -> None:
        """Extend a session's TTL.

        Raises:
            ConsulNotFound: the session expired or was destroyed; any lock it held is lost.
            ConsulError: any other failure.
        """
        check_name("session id", session_id)
        await self._api.session.renew(session_id)

    async def session_destroy(self, session_id: str) -> None:
        """Destroy a session, releasing (or deleting) the locks it holds.

        Raises:
            ConsulError: any failure.
        """
        check_name("session id", session_id)
        await self._api.session.destroy(session_id)

    # -- cluster -----------------------------------------------------------------------------

    async def datacenter(self) -> str:
        """The datacenter of the agent we talk to.

        Raises:
            ConsulError: any failure (needs ``agent:read``).
        """
        raw = await self._api.agent.self()
        config = raw.get("Config") if isinstance(raw, dict) else None
        dc = config.get("Datacenter") if isinstance(config, dict) else None
        if not isinstance(dc, str) or not dc:
            where = self._http.describe("GET", "/v1/agent/self")
            raise ConsulBadResponse(f"{where}: no Config.Datacenter in the answer")
        return dc

    async def leader(self) -> str:
        """The Raft leader's address, or ``""`` while the cluster has none.

        Raises:
            ConsulError: any failure.
        """
        raw = await self._api.status.leader()
        if not isinstance(raw, str):
            where = self._http.describe("GET", "/v1/status/leader")
            raise ConsulBadResponse(f"{where}: expected a string, got {raw!r:.80}")
        return raw
