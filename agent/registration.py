"""Registering this host's services, and the agent itself, with the local Consul agent.

Design note. What to register is decided synchronously (:func:`service_registration`,
:func:`agent_registration`, :func:`plan_sync`); :class:`Registrar` performs it. Consul
keeps registrations across its own restarts only when it has a data dir; a dev agent, or a
wiped one, forgets them. Two mechanisms bring them back:

* the agent's TTL check is passed every ``ttl/3``; when that fails (the check is unknown
  or Consul was unreachable) everything is registered again at once;
* anti-entropy: every ``anti_entropy_s`` everything is registered again. Registration is
  idempotent in Consul: an unchanged definition keeps its checks' status and does not
  move the catalog index, so this costs no watcher a wake-up.

On shutdown the agent calls :meth:`Registrar.deregister_all` before it stops its proxies,
so clients stop picking this host while its proxies still carry their connections.
"""

from __future__ import annotations

import ipaddress
import logging
import math
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass

import trio

from meshd import __version__
from meshd.config import CheckConfig, ServiceConfig
from meshd.consul import (
    CheckDefinition,
    ConsulClient,
    ConsulError,
    ConsulNotFound,
    ServiceRegistration,
)
from meshd.logevents import log_event
from meshd.registry import (
    AGENT_SERVICE,
    META_METRICS_PORT,
    META_PROTOCOL,
    META_PROXY_PORT,
    META_VERSION,
)

log = logging.getLogger("meshd.agent.registration")


def _host_port(host: str, port: int) -> str:
    try:
        is_v6 = ipaddress.ip_address(host).version == 6
    except ValueError:
        is_v6 = False
    return f"[{host}]:{port}" if is_v6 else f"{host}:{port}"


def check_definition(
    check: CheckConfig, *, host: str, port: int, check_id: str | None
) -> CheckDefinition:
    """Consul's definition of one configured check against ``host:port``."""
    if check.kind == "ttl":
        return CheckDefinition(
            kind="ttl",
            ttl_s=check.ttl,
            check_id=check_id,
            deregister_after_s=check.deregister_after,
        )
    target = _host_port(host, port)
    if check.kind == "http":
        target = f"http://{target}{check.path or '/'}"
    return CheckDefinition(
        kind=check.kind,
        target=target,
        interval_s=check.interval,
        timeout_s=check.timeout,
        deregister_after_s=check.deregister_after,
    )


def service_registration(
    service: ServiceConfig, *, inbound_port: int, check_host: str = "127.0.0.1"
) -> ServiceRegistration:
    """The registration of one local service, marked as meshed in its meta.

    Args:
        service: the service file's content.
        inbound_port: where the inbound proxy listens (advertised in meta).
        check_host: where Consul's checks reach the application when the service has no
            address of its own (the local Consul agent runs them).
    """
    meta = dict(service.meta)
    meta.update(
        {
            META_VERSION: __version__,
            META_PROXY_PORT: str(inbound_port),
            META_PROTOCOL: service.protocol,
        }
    )
    host = service.address or check_host
    checks = tuple(
        check_definition(
            c, host=host, port=service.port, check_id=ttl_check_id(service.id, n, c.kind)
        )
        for n, c in enumerate(service.checks)
    )
    return ServiceRegistration(
        name=service.name,
        service_id=service.id,
        address=service.address or None,
        port=service.port,
        tags=service.tags,
        meta=meta,
        checks=checks,
    )


def ttl_check_id(service_id: str, n: int, kind: str) -> str | None:
    """The explicit id of TTL checks (the agent passes them); None for other kinds."""
    return f"{service_id}:ttl:{n}" if kind == "ttl" else None


def agent_registration(
    *, service_id: str, metrics_port: int, address: str | None = None, ttl_s: float = 15.0
) -> ServiceRegistration:
    """The agent's own registration: a TTL check it keeps passing, its metrics port as the
    service's port and in meta (none when the metrics port is off, 0).

    Prometheus finds agents through ``consul_sd_configs`` on service ``meshd-agent``.
    """
    metrics = {META_METRICS_PORT: str(metrics_port)} if metrics_port else {}
    return ServiceRegistration(
        name=AGENT_SERVICE,
        service_id=service_id,
        address=address,
        port=metrics_port,
        tags=("meshd",),
        meta={META_VERSION: __version__, **metrics},
        checks=(CheckDefinition(kind="ttl", ttl_s=ttl_s, check_id=f"{service_id}:ttl"),),
    )


def ttl_checks(registration: ServiceRegistration) -> tuple[tuple[str, float], ...]:
    """``(check id, ttl)`` of every TTL check in *registration* that has an explicit id."""
    return tuple(
        (c.check_id, c.ttl_s)
        for c in registration.checks
        if c.kind == "ttl" and c.check_id is not None and c.ttl_s is not None
    )


@dataclass(frozen=True)
class SyncPlan:
    """What to change in Consul: registrations to (re)send, service ids to remove."""

    register: tuple[ServiceRegistration, ...]
    deregister: tuple[str, ...]


def plan_sync(
    registered: Mapping[str, ServiceRegistration], desired: Iterable[ServiceRegistration]
) -> SyncPlan:
    """Diff what we registered against what the service files say now."""
    wanted = {r.effective_id: r for r in desired}
    return SyncPlan(
        register=tuple(r for sid, r in sorted(wanted.items()) if registered.get(sid) != r),
        deregister=tuple(sorted(set(registered) - set(wanted))),
    )


@dataclass(frozen=True)
class RegistrationStatistics:
    """State of a :class:`Registrar`."""

    services: frozenset[str]
    registrations: int
    deregistrations: int
    full_passes: int
    ttl_passes: int
    errors: int
    last_error: str | None
    draining: bool


class Registrar:
    """Keeps Consul's registrations equal to this host's services. One per agent."""

    def __init__(
        self,
        consul: ConsulClient,
        agent: ServiceRegistration,
        *,
        inbound_port: int,
        check_host: str = "127.0.0.1",
    ) -> None:
        """Nothing is registered until :meth:`sync` or :meth:`register_all`."""
        self._consul = consul
        self._agent = agent
        self._inbound_port = inbound_port
        self._check_host = check_host
        self._services: dict[str, ServiceRegistration] = {}
        self._lock = trio.Lock()
        self._draining = False
        self._counts = {"reg": 0, "dereg": 0, "full": 0, "ttl": 0, "err": 0}
        self._last_error: str | None = None

    def ttl_interval(self) -> float:
        """How often TTL checks are passed: a third of the shortest TTL."""
        ttls = [ttl for r in self._all() for _, ttl in ttl_checks(r)]
        return min(ttls) / 3 if ttls else math.inf

    def _all(self) -> list[ServiceRegistration]:
        return [self._agent, *self._services.values()]

    def _error(self, what: str, exc: ConsulError) -> None:
        self._counts["err"] += 1
        self._last_error = f"{what}: {exc}"
        log_event(log, logging.WARNING, "registration_failed", what=what, error=str(exc))

    async def sync(self, services: Iterable[ServiceConfig]) -> bool:
        """Register new or changed services, deregister those whose file was removed.

        Returns:
            True if Consul took every change; on errors the rest is still attempted and
            anti-entropy retries later.
        """
        desired = [
            service_registration(s, inbound_port=self._inbound_port, check_host=self._check_host)
            for s in services
        ]
        async with self._lock:
            if self._draining:
                return False
            plan = plan_sync(self._services, desired)
            self._services = {r.effective_id: r for r in desired}
            ok = True
            for sid in plan.deregister:
                ok = await self._deregister(sid) and ok
            for registration in (self._agent, *plan.register):
                ok = await self._register(registration) and ok
            return ok

    async def register_all(self) -> bool:
        """Send every registration again (anti-entropy, or after Consul lost them)."""
        async with self._lock:
            if self._draining:
                return False
            self._counts["full"] += 1
            ok = True
            for registration in self._all():
                ok = await self._register(registration) and ok
            return ok

    async def pass_ttls(self) -> bool:
        """Pass every TTL check; False if any pass failed (e.g. Consul forgot the check)."""
        ok = True
        for registration in self._all():
            for check_id, _ in ttl_checks(registration):
                if self._draining:
                    return True
                try:
                    await self._consul.check_pass(check_id)
                    self._counts["ttl"] += 1
                except ConsulError as exc:
                    self._error(f"passing TTL check {check_id}", exc)
                    ok = False
        return ok

    async def deregister_all(self) -> None:
        """Deregister the local services, then the agent; stop (re)registering for good.

        The agent calls this first in its drain sequence, before stopping the proxies.
        Failures are logged: Consul's checks will mark what is left critical anyway.
        """
        async with self._lock:
            self._draining = True
            for sid in sorted(self._services):
                await self._deregister(sid)
            await self._deregister(self._agent.effective_id)

    async def _register(self, registration: ServiceRegistration) -> bool:
        try:
            await self._consul.service_register(registration)
        except ConsulError as exc:
            self._error(f"registering {registration.effective_id}", exc)
            return False
        self._counts["reg"] += 1
        return True

    async def _deregister(self, service_id: str) -> bool:
        try:
            await self._consul.service_deregister(service_id)
        except ConsulNotFound:
            pass  # already gone, which is what we wanted
        except ConsulError as exc:
            self._error(f"deregistering {service_id}", exc)
            return False
        self._counts["dereg"] += 1
        return True

    def statistics(self) -> RegistrationStatistics:
        """A frozen view of the registrar."""
        return RegistrationStatistics(
            services=frozenset(self._services),
            registrations=self._counts["reg"],
            deregistrations=self._counts["dereg"],
            full_passes=self._counts["full"],
            ttl_passes=self._counts["ttl"],
            errors=self._counts["err"],
            last_error=self._last_error,
            draining=self._draining,
        )


async def serve_registration(
    consul: ConsulClient,
    services: Iterable[ServiceConfig],
    *,
    agent_service_id: str,
    metrics_port: int,
    inbound_port: int = 15006,
    address: str | None = None,
    check_host: str = "127.0.0.1",
    ttl_s: float = 15.0,
    anti_entropy_s: float = 30.0,
    services_ready: Callable[[], Awaitable[None]] | None = None,
    task_status: trio.TaskStatus[Registrar] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Register the services and the agent, then keep them registered until cancelled.

    Started after the first registration attempt, whether or not Consul answered (the
    data plane must not wait for Consul); the loops retry. Cancelling does not
    deregister: call :meth:`Registrar.deregister_all` first when shutting down.

    Args:
        consul: client of the local Consul agent.
        services: the current service files (later changes go to :meth:`Registrar.sync`).
        agent_service_id: the agent's own service id (unique per host).
        metrics_port: the agent's metrics port (advertised for Prometheus; 0: none).
        inbound_port: the inbound proxy's port (advertised in service meta).
        address: the agent's advertised address (None: Consul uses the node's).
        check_host: where Consul's checks reach applications without an address.
        ttl_s: TTL of the agent's check; it is passed every ``ttl_s / 3``.
        anti_entropy_s: period of the full re-registration.
        services_ready: awaited before the services (not the agent) are first registered,
            so Consul sends no caller to an instance whose proxy cannot serve it yet.
        task_status: started with the :class:`Registrar`.
    """
    agent = agent_registration(
        service_id=agent_service_id, metrics_port=metrics_port, address=address, ttl_s=ttl_s
    )
    registrar = Registrar(consul, agent, inbound_port=inbound_port, check_host=check_host)
    if services_ready is not None:
        await registrar.sync(())  # the agent itself at once
        await registrar.pass_ttls()
        task_status.started(registrar)
        while True:  # keep the agent's own TTL check passing meanwhile
            with trio.move_on_after(registrar.ttl_interval()):
                await services_ready()
                break
            await registrar.pass_ttls()
    await registrar.sync(services)
    await registrar.pass_ttls()
    if services_ready is None:
        task_status.started(registrar)
    next_full = trio.current_time() + anti_entropy_s
    while True:
        await trio.sleep(min(registrar.ttl_interval(), max(0.0, next_full - trio.current_time())))
        if trio.current_time() >= next_full:
            next_full = trio.current_time() + anti_entropy_s
            await registrar.register_all()
        if not await registrar.pass_ttls():
            # Consul forgot our checks (restart) or was away: restore everything now.
            await registrar.register_all()
            await registrar.pass_ttls()
